#!/usr/bin/env bash
# The model lifecycle on the UCI digits, end to end on real processes over
# mutual TLS: three hospitals whose rows arrive in three batches, and a
# cloud party with more compute.
#   1. a small edge MLP is trained federatedly on the hospitals' first
#      batch, a cloud CNN on the cloud party's own rows;
#   2. both are deployed (signed by the administrator): hospital-a serves
#      the edge model on its local endpoint with the CNN as its cloud tier
#      (joint inference; its policy lets hard examples go to the cloud,
#      encrypted end to end, each one written to its audit log);
#   3. a load generator sends hospital-a's held-out rows throughout;
#   4. an incremental pipeline retrains from the deployed version as each
#      batch arrives, gates each candidate on the held-out rows, and deploys
#      when the gate passes; the endpoint swaps versions under load.
# Prints the pipeline's iterations, the load report (no request may fail),
# and a JSON line. Not part of `make test` (its pieces are tested there).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/demo-lib.sh
BIN=${CONFIDE_BIN:-target/debug}
DEMO=target/demo-lifecycle
rm -rf "$DEMO"
mkdir -p "$DEMO/logs"
HOSPITALS=(hospital-a hospital-b hospital-c)
ALL=(hospital-a hospital-b hospital-c cloud)
LOAD_SECS=${CONFIDE_DEMO_LOAD_SECS:-60}
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
csv() { local IFS=,; echo "$*"; }

echo "== 1. PKI (CA, coordinator, admin, 3 hospitals, 1 cloud party) in $DEMO/pki"
"$BIN/confide" certs init --dir "$DEMO/pki" --parties "$(csv "${ALL[@]}")" >/dev/null

echo "== 2. the UCI digits: 20% held out; the rest split over the hospitals and the cloud party"
"$BIN/confide" data split --input examples/data/digits.csv.gz --parties "$(csv "${ALL[@]}")" \
  --weights 1,1,1,1 --test-fraction 0.2 --seed 5 --out "$DEMO/data" | sed 's/^/   /'
# Each hospital's rows in three batches; only the first has arrived.
for h in "${HOSPITALS[@]}"; do
  mkdir -p "$DEMO/batches/$h" "$DEMO/incoming/$h"
  rows=$(wc -l <"$DEMO/data/$h.csv"); per=$(( (rows + 2) / 3 ))
  split -d -a 3 --numeric-suffixes=1 --additional-suffix=.csv -l "$per" "$DEMO/data/$h.csv" "$DEMO/incoming/$h/"
  mv "$DEMO/incoming/$h/001.csv" "$DEMO/batches/$h/001.csv"
done
BATCH_ROWS=$(wc -l <"$DEMO/batches/hospital-a/001.csv")

echo "== 3. coordinator"
start_coordinator

echo "== 4. parties (they only dial out); hospital-a serves \"digits\" on a local endpoint"
for p in "${ALL[@]}"; do
  if [ "$p" = cloud ]; then
    data="data/cloud.csv"
    extra=$'[serve]\nservices = ["digits-cloud"]\n[cloud]\nservices = ["digits-cloud"]'
  else
    data="batches/$p"
    extra=""
  fi
  if [ "$p" = hospital-a ]; then
    extra=$'[serve]\nservices = ["digits"]\nlisten = "127.0.0.1:0"\n[policy.share_inputs]\ndigits = ["cloud"]'
  fi
  cat >"$DEMO/$p.toml" <<TOML
coordinator = "https://$ADDR"
ca = "pki/ca.pem"
cert = "pki/parties/$p.pem"
key = "pki/parties/$p.key"

[datasets.digits]
path = "$data"

[training]
threads = 1

$extra
TOML
  "$BIN/confide-party" run --config "$DEMO/$p.toml" 2>"$DEMO/logs/$p.log" &
  PIDS+=($!)
done
for _ in $(seq 200); do grep -q "prediction endpoint listening" "$DEMO/logs/hospital-a.log" 2>/dev/null && break; sleep 0.1; done
ENDPOINT=$(sed -n 's/.*prediction endpoint listening.*bound=\([0-9.:]*\).*/\1/p' "$DEMO/logs/hospital-a.log" | head -1)
[ -n "$ENDPOINT" ] || { echo "hospital-a's endpoint did not start:"; cat "$DEMO/logs/hospital-a.log"; exit 1; }
echo "   hospital-a's endpoint at http://$ENDPOINT"

export CONFIDE_COORDINATOR="https://$ADDR" CONFIDE_PKI="$DEMO/pki"
spec() { # name kind parties model rounds extra
  cat <<TOML
name = "$1"
kind = "$2"
rounds = $5
[parties]
names = [$3]
dataset = "digits"
[model]
$4
[training]
local_epochs = 2
optimizer = "adam"
learning_rate = 0.01
batch_size = 32
seed = 7
[timeouts]
recruit_secs = 60
$6
TOML
}
QUOTED=$(printf '"%s", ' "${HOSPITALS[@]}"); QUOTED=${QUOTED%, }
EDGE_MODEL=$'kind = "mlp"\nclasses = 10\nhidden = [32]'
spec "edge mlp" train "$QUOTED" "$EDGE_MODEL" 3 "" >"$DEMO/edge.toml"
spec "cloud cnn" train '"cloud"' $'kind = "cnn"\nclasses = 10\nchannels = [8, 16]\nimage = [1, 8, 8]' 8 "" >"$DEMO/cloud.toml"

echo "== 5. training the edge MLP (3 hospitals, first batch) and the cloud CNN (cloud party)"
EDGE=$("$BIN/confide" job submit "$DEMO/edge.toml" | head -1)
CLOUD=$("$BIN/confide" job submit "$DEMO/cloud.toml" | head -1)
for j in "$EDGE" "$CLOUD"; do "$BIN/confide" job watch "$j" >/dev/null; done
"$BIN/confide" job status "$EDGE" | sed -n '1,4p' | sed 's/^/   /'
"$BIN/confide" job status "$CLOUD" | sed -n '1,4p' | sed 's/^/   /'

echo "== 6. deploying: the CNN as digits-cloud, the MLP as digits with the CNN as its cloud tier"
"$BIN/confide" model deploy digits-cloud --job "$CLOUD" | sed 's/^/   /'
"$BIN/confide" model deploy digits --job "$EDGE" --cloud cloud --cloud-service digits-cloud \
  --hard-examples confidence --threshold 0.9 --timeout-ms 1000 | sed 's/^/   /'
for _ in $(seq 300); do
  curl -sf "http://$ENDPOINT/healthz" | grep -q '"ready":true' && break; sleep 0.1
done

echo "== 7. a load generator sends hospital-a's held-out rows for $LOAD_SECS s (2 clients)"
"$BIN/confide-bench" load --addr "$ENDPOINT" --service digits --data "$DEMO/data/test.csv" \
  --clients 2 --seconds "$LOAD_SECS" >"$DEMO/load.json" 2>"$DEMO/logs/load.log" &
LOAD=$!

echo "== 8. the incremental pipeline: retrain when $BATCH_ROWS new rows arrive, gate on accuracy, deploy"
spec "edge pipeline" incremental "$QUOTED" "$EDGE_MODEL" 3 "[incremental]
service = \"digits\"
min_new_rows = $BATCH_ROWS
poll_secs = 1.0
metric = \"accuracy\"
min_delta = 0.005
max_iterations = 3" >"$DEMO/pipeline.toml"
PIPE=$("$BIN/confide" job submit "$DEMO/pipeline.toml" | head -1)
echo "   pipeline $PIPE (its first iteration retrains on the first batch, new to it)"
wait_iteration() {
  for _ in $(seq 600); do
    n=$("$BIN/confide" job status "$PIPE" --json | python3 -c "import json,sys; s=json.load(sys.stdin); print(sum(1 for i in s.get('iterations', []) if i['outcome'] != 'running'))")
    [ "$n" -ge "$1" ] && return 0; sleep 0.5
  done
  echo "the pipeline did not finish iteration $1:"; "$BIN/confide" job status "$PIPE"; exit 1
}
wait_iteration 1
for b in 002 003; do
  echo "   batch $b arrives at each hospital"
  for h in "${HOSPITALS[@]}"; do
    cp "$DEMO/incoming/$h/$b.csv" "$DEMO/batches/$h/.$b.tmp" && mv "$DEMO/batches/$h/.$b.tmp" "$DEMO/batches/$h/$b.csv"
  done
  wait_iteration $(( 10#$b ))
done
"$BIN/confide" job status "$PIPE" | sed 's/^/   /'
wait "$LOAD"
"$BIN/confide" model services digits | sed 's/^/   /'

if [ "${CONFIDE_DEMO_HOLD:-0}" != 0 ]; then
  echo "   (the federation stays up for $CONFIDE_DEMO_HOLD s: try curl http://$ENDPOINT/healthz)"
  sleep "$CONFIDE_DEMO_HOLD"
fi
echo "== 9. what the load generator saw, and hospital-a's audit log"
python3 - "$DEMO" <<'PY'
import json, sys
demo = sys.argv[1]
load = json.loads(open(f"{demo}/load.json").read().strip().splitlines()[-1])
audit = [json.loads(l) for l in open(f"{demo}/pki/parties/hospital-a.audit.jsonl") if l.strip()]
print(f"   {load['requests']} requests, {load['failures']} failed, p50 {load['p50_ms']:.2f} ms, "
      f"p99 {load['p99_ms']:.2f} ms; answers by deployment {load['versions']}; "
      f"rows answered by the cloud tier {load['rows_from_cloud']}")
print(f"   hospital-a's audit log: {len(audit)} forwarded inputs, all to "
      f"{sorted({a['destination'] for a in audit}) or '-'}")
print(json.dumps({"requests": load["requests"], "failures": load["failures"],
                  "versions": load["versions"], "forwarded": len(audit)}))
sys.exit(0 if load["failures"] == 0 else 1)
PY
