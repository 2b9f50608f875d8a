#!/usr/bin/env bash
# End-to-end demo: a fresh PKI, a coordinator and three hospital parties on
# loopback over mutual TLS; the hospitals train an MLP with libtorch for 20
# rounds on non-IID slices of the UCI breast-cancer data, with Confide's
# strongest privacy: example-level differential privacy at each hospital
# (DP-SGD, ε ≤ 4 at δ = 1e-5, checked against each hospital's own budget and
# recorded in its ledger) under secure aggregation. The demo then scores the
# federated model on held-out rows no party saw, trains the same model
# centrally on the pooled rows (with the same DP-SGD) for comparison, and
# prints one JSON line for scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/demo-lib.sh
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

echo "== 2. splitting the UCI breast-cancer data non-IID across the hospitals (sizes 5:3:2 on average,"
echo "      class balance drawn from Dirichlet(1)); 20% held out as a test set no party sees"
"$BIN/confide" data split --input examples/data/breast_cancer.csv --header \
  --parties "$(IFS=,; echo "${PARTIES[*]}")" --weights 5,3,2 --dirichlet 1.0 --test-fraction 0.2 --seed 7 \
  --out "$DEMO/data" | sed 's/^/   /'

echo "== 3. starting the coordinator"
start_coordinator

# Each data set may spend at most this record-level ε across all jobs; a job
# without differential privacy (ε = ∞) is refused. CONFIDE_DEMO_MAX_EPSILON=none
# lifts the limit (scripts/privacy_utility.py runs the job without DP too).
MAX_EPSILON=${CONFIDE_DEMO_MAX_EPSILON:-10.0}
MAX_EPSILON_LINE="max_epsilon = $MAX_EPSILON"
[ "$MAX_EPSILON" = none ] && MAX_EPSILON_LINE=""
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
features = 30

[policy]
job_kinds = ["train", "evaluate"]
aggregation = ["none", "secagg"]
$MAX_EPSILON_LINE
TOML
  "$BIN/confide-party" run --config "$DEMO/$p.toml" 2>"$DEMO/logs/$p.log" &
  PIDS+=($!)
done

export CONFIDE_COORDINATOR="https://$ADDR" CONFIDE_PKI="$DEMO/pki"
SPEC=${CONFIDE_DEMO_SPEC:-examples/jobs/breast-cancer-dp.toml}
echo "== 5. submitting $SPEC"
echo "      (libtorch MLP; DP-SGD at each hospital; secure aggregation: the coordinator sees only masked vectors)"
"$BIN/confide" job validate "$SPEC" | sed 's/^/   /' 
JOB=$("$BIN/confide" job submit "$SPEC" | head -1)
echo "   job $JOB"
# The web dashboard, on this machine, reading the admin API with the admin
# certificate (CONFIDE_DEMO_DASHBOARD=ADDR picks its address).
"$BIN/confide" dashboard --listen "${CONFIDE_DEMO_DASHBOARD:-127.0.0.1:0}" \
  >"$DEMO/logs/dashboard.out" 2>"$DEMO/logs/dashboard.log" &
PIDS+=($!)
for _ in $(seq 100); do grep -q "^open " "$DEMO/logs/dashboard.out" 2>/dev/null && break; sleep 0.1; done
DASHBOARD=$(sed -n 's/^dashboard listening on //p' "$DEMO/logs/dashboard.out")
# Every request carries the run's token (the address it prints sets it as
# a cookie): loopback alone would open it to every user of the machine.
TOKEN=$(sed -n 's/^open .*[?]token=//p' "$DEMO/logs/dashboard.out")
echo "   follow it live at $DASHBOARD/jobs/$JOB?token=$TOKEN"
"$BIN/confide" job watch "$JOB"
MODEL="$DEMO/model.safetensors"
"$BIN/confide" job model "$JOB" --out "$MODEL"
"$BIN/confide" job status "$JOB" --json >"$DEMO/status.json"

echo "== 6. hospital-a's privacy ledger"
"$BIN/confide-party" budget --config "$DEMO/hospital-a.toml" | sed 's/^/   /'
echo "== 7. scoring the federated model on the held-out test rows"
"$BIN/confide-party" evaluate --spec "$SPEC" --model "$MODEL" --data "$DEMO/data/test.csv" --json \
  >"$DEMO/federated.json"
echo "== 8. the same model and schedule trained centrally on the pooled hospital rows (for comparison only)"
"$BIN/confide-party" train-local --spec "$SPEC" --json --test "$DEMO/data/test.csv" \
  $(for p in "${PARTIES[@]}"; do echo --data "$DEMO/data/$p.csv"; done) >"$DEMO/central.json"
echo "   and by each hospital alone:"
for p in "${PARTIES[@]}"; do
  "$BIN/confide-party" train-local --spec "$SPEC" --json --test "$DEMO/data/test.csv" --data "$DEMO/data/$p.csv" \
    >"$DEMO/local-$p.json"
done

# CONFIDE_DEMO_SCREENSHOT=FILE: the finished job's dashboard page as a PNG
# (headless Chromium; how the README's screenshot is made).
if [ -n "${CONFIDE_DEMO_SCREENSHOT:-}" ] && [ -n "$DASHBOARD" ]; then
  chromium --headless=new --no-sandbox --disable-gpu --disable-dev-shm-usage --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars \
    --user-data-dir="$DEMO/chromium" --window-size=1340,1200 --screenshot="$CONFIDE_DEMO_SCREENSHOT" \
    "$DASHBOARD/jobs/$JOB?token=$TOKEN" 2>/dev/null
  echo "   dashboard screenshot: $CONFIDE_DEMO_SCREENSHOT"
fi

python3 - "$DEMO" "$MODEL" "$SPEC" "${PARTIES[@]}" <<'PY'
import json, re, sys
demo, model, spec_path, parties = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
status = json.load(open(f"{demo}/status.json"))
fed = json.load(open(f"{demo}/federated.json"))
central = json.load(open(f"{demo}/central.json"))["test"]
acc = fed["metrics"]["accuracy"]
cacc = central["metrics"]["accuracy"]
for p in parties:
    local = json.load(open(f"{demo}/local-{p}.json"))["test"]["metrics"]
    print(f"   {p} alone: test accuracy {local['accuracy']:.4f}")
print()
eps = status["privacy"].get("epsilon")
dp = f", ε = {eps:.3f} at δ = {status['privacy']['delta']:g} per hospital" if eps is not None else ", no DP"
print(f"federated test accuracy: {acc:.4f}  (auc {fed['metrics'].get('auc', float('nan')):.4f}, "
      f"{fed['examples']} held-out rows, {status['rounds_completed']} rounds, aggregation {status['privacy']['aggregation']}{dp})")
print(f"central test accuracy:   {cacc:.4f}  (same model, pooled rows; difference {100 * (cacc - acc):+.1f} points)")
print(f"model: {model}")
print(json.dumps({"federated_accuracy": round(acc, 4), "central_accuracy": round(cacc, 4),
                  "rounds": status["rounds_completed"], "privacy": status["privacy"]["aggregation"],
                  "epsilon": None if eps is None else round(eps, 4), "model": model}))
if status["state"] != "succeeded":
    sys.exit(1)
# A DP spec's run must report its ε, within the spec's target when it sets one
# (read with a pattern: tomllib needs Python 3.11).
dp_table = re.search(r"^\s*\[dp\][^\n]*(?:\n|\Z)(.*?)(?=^\s*\[[A-Za-z_]|\Z)", open(spec_path).read(), re.M | re.S)
if dp_table is not None:
    target = re.search(r"^\s*target_epsilon\s*=\s*([0-9.eE+-]+)", dp_table.group(1), re.M)
    if eps is None:
        sys.exit("the job has [dp] but its status reports no ε")
    if target is not None and eps > float(target.group(1)) * (1 + 1e-9):
        sys.exit(f"ε = {eps} exceeds the spec's target_epsilon = {target.group(1)}")
PY
# CONFIDE_DEMO_HOLD=1: keep the federation and the dashboard running to look around.
if [ -n "${CONFIDE_DEMO_HOLD:-}" ]; then
  echo "the federation and the dashboard ($DASHBOARD/?token=$TOKEN) keep running; Ctrl-C ends them"
  wait
fi
