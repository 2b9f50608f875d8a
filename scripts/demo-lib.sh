# Shared by the demo scripts (sourced): $BIN holds the binaries, $DEMO the
# demo's directory (with pki/ and logs/), PIDS the processes to stop.

# Starts the coordinator on a free loopback port and sets ADDR to it.
start_coordinator() {
  "$BIN/confide" coordinator serve --listen 127.0.0.1:0 --data-dir "$DEMO/coordinator" --pki "$DEMO/pki" \
    --metrics-listen 127.0.0.1:0 >"$DEMO/logs/coordinator.out" 2>"$DEMO/logs/coordinator.log" &
  PIDS+=($!)
  for _ in $(seq 100); do grep -q "^coordinator listening on" "$DEMO/logs/coordinator.out" 2>/dev/null && break; sleep 0.1; done
  ADDR=$(sed -n 's/^coordinator listening on //p' "$DEMO/logs/coordinator.out")
  [ -n "$ADDR" ] || { echo "coordinator did not start:"; cat "$DEMO/logs/coordinator.log"; exit 1; }
  echo "   coordinator at $ADDR (metrics: http://$(sed -n 's/^metrics listening on //p' "$DEMO/logs/coordinator.out")/metrics)"
}
