#!/usr/bin/env bash
# End-to-end demo: a fresh PKI, a coordinator and three hospital parties on
# loopback over mutual TLS, one federated job on the UCI breast-cancer data.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${CONFIDE_BIN:-target/debug}
DEMO=target/demo
rm -rf "$DEMO"
mkdir -p "$DEMO/logs"
PARTIES=(hospital-a hospital-b hospital-c)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

echo "== 1. federation PKI (CA, coordinator, admin, 3 parties) in $DEMO/pki"
"$BIN/confide" certs init --dir "$DEMO/pki" --parties "$(IFS=,; echo "${PARTIES[*]}")" >/dev/null

echo "== 2. splitting the UCI breast-cancer data across the hospitals (unequal sizes)"
"$BIN/confide" data split --input examples/data/breast_cancer.csv --header \
  --parties "$(IFS=,; echo "${PARTIES[*]}")" --weights 5,3,2 --test-fraction 0.2 --seed 7 --out "$DEMO/data"

echo "== 3. starting the coordinator"
"$BIN/confide" coordinator serve --listen 127.0.0.1:0 --data-dir "$DEMO/coordinator" --pki "$DEMO/pki" \
  >"$DEMO/logs/coordinator.out" 2>"$DEMO/logs/coordinator.log" &
PIDS+=($!)
for _ in $(seq 100); do grep -q "listening on" "$DEMO/logs/coordinator.out" 2>/dev/null && break; sleep 0.1; done
ADDR=$(sed -n 's/.*listening on //p' "$DEMO/logs/coordinator.out")
[ -n "$ADDR" ] || { echo "coordinator did not start:"; cat "$DEMO/logs/coordinator.log"; exit 1; }
echo "   coordinator at $ADDR"

echo "== 4. starting the parties (they only dial out)"
for p in "${PARTIES[@]}"; do
  cat >"$DEMO/$p.toml" <<TOML
coordinator = "https://$ADDR"
ca = "pki/ca.pem"
cert = "pki/parties/$p.pem"
key = "pki/parties/$p.key"

[datasets.breast-cancer]
path = "data/$p.csv"
format = "csv"

[policy]
job_kinds = ["train", "evaluate"]
privacy_modes = ["none", "secagg"]
TOML
  "$BIN/confide-party" run --config "$DEMO/$p.toml" 2>"$DEMO/logs/$p.log" &
  PIDS+=($!)
done

export CONFIDE_COORDINATOR="https://$ADDR" CONFIDE_PKI="$DEMO/pki"
SPEC=${CONFIDE_DEMO_SPEC:-examples/jobs/breast-cancer-secagg.toml}
echo "== 5. submitting $SPEC (secure aggregation: the coordinator sees only masked vectors)"
JOB=$("$BIN/confide" job submit "$SPEC" | head -1)
echo "   job $JOB"
"$BIN/confide" job watch "$JOB"
"$BIN/confide" job model "$JOB" --out "$DEMO/model.safetensors"
STATUS=$("$BIN/confide" job status "$JOB" --json)
echo "$STATUS" >"$DEMO/status.json"
python3 - "$DEMO/status.json" "$DEMO/model.safetensors" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
m = s.get("metrics", {})
print()
print(f"federated accuracy (parties' held-out rows): {m.get('accuracy', float('nan')):.4f}"
      f"  auc: {m.get('auc', float('nan')):.4f}  after {s['rounds_completed']} rounds")
print(f"model: {sys.argv[2]}")
print(json.dumps({"state": s["state"], "accuracy": m.get("accuracy"), "rounds": s["rounds_completed"],
                  "privacy": s["privacy"]["mode"], "model": sys.argv[2]}))
sys.exit(0 if s["state"] == "succeeded" else 1)
PY
