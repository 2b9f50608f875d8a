#!/usr/bin/env python3
"""Privacy-utility sweep of the demo job (examples/jobs/breast-cancer-dp.toml).

For each target epsilon in {0.5, 1, 2, 4, 8, inf} (inf: the same job without
the [dp] table), runs the demo federation (scripts/demo.sh: three hospitals,
DP-SGD at each, secure aggregation) and records the federated model's test
accuracy, and the same model trained centrally on the pooled rows with the
same DP-SGD (the demo's central baseline). Writes docs/privacy-utility.json,
the Markdown table docs/privacy-utility.md and the plot
docs/privacy-utility.png.

    cargo build --workspace --bins
    python3 -m venv /tmp/plot && /tmp/plot/bin/pip install matplotlib
    /tmp/plot/bin/python scripts/privacy_utility.py [--repeats 20]

Every run draws fresh noise from the operating system's CSPRNG, so figures
vary from run to run; each cell is the mean over the repeats, with the
spread (20 runs a target take about 5 minutes on the 2-core machine).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, "examples/jobs/breast-cancer-dp.toml")
EPSILONS = [0.5, 1.0, 2.0, 4.0, 8.0, None]


def spec_for(epsilon):
    text = open(SPEC).read()
    if epsilon is not None:
        return re.sub(r"^target_epsilon = .*$", f"target_epsilon = {epsilon}", text, flags=re.M)
    # No DP: drop the [dp] table; standardisation then comes from the
    # securely summed feature statistics, and updates weigh their examples.
    text = re.sub(r"^\[dp\]\n.*?(?=^\[aggregation\])", "", text, flags=re.M | re.S)
    return re.sub(r"^max_examples = 1 .*$", "max_examples = 1000", text, flags=re.M)


def run_demo(spec_path):
    env = dict(os.environ, CONFIDE_DEMO_SPEC=spec_path, CONFIDE_DEMO_MAX_EPSILON="none")
    out = subprocess.run(["scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"demo failed for {spec_path}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--epsilons", default="0.5,1,2,4,8,inf",
                    help="targets to run; rows for other targets are kept from docs/privacy-utility.json")
    args = ap.parse_args()
    wanted = [None if e == "inf" else float(e) for e in args.epsilons.split(",")]
    out_json = os.path.join(ROOT, "docs/privacy-utility.json")
    kept = {}
    if os.path.exists(out_json):
        kept = {r["target_epsilon"]: r for r in json.load(open(out_json))["rows"]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for eps in EPSILONS:
            if eps not in wanted:
                if eps in kept:
                    rows.append(kept[eps])
                continue
            path = os.path.join(tmp, f"spec-{eps}.toml")
            open(path, "w").write(spec_for(eps))
            runs = [run_demo(path) for _ in range(args.repeats)]
            fed = [r["federated_accuracy"] for r in runs]
            cen = [r["central_accuracy"] for r in runs]
            spent = [r["epsilon"] for r in runs]
            row = {
                "target_epsilon": eps,
                "epsilon_spent": max(spent) if eps is not None else None,
                "federated_accuracy": statistics.mean(fed),
                "federated_spread": [min(fed), max(fed)],
                "central_accuracy": statistics.mean(cen),
                "central_spread": [min(cen), max(cen)],
                "runs": len(runs),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    json.dump({"generator": "scripts/privacy_utility.py", "spec": "examples/jobs/breast-cancer-dp.toml",
               "delta": 1e-5, "rows": rows}, open(out_json, "w"), indent=1)
    with open(os.path.join(ROOT, "docs/privacy-utility.md"), "w") as f:
        f.write("| target ε (δ = 1e-5) | federated test accuracy | central test accuracy |\n|---|---|---|\n")
        for r in rows:
            eps = "∞ (no DP)" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}"
            fs, cs = r["federated_spread"], r["central_spread"]
            f.write(f"| {eps} | {r['federated_accuracy']:.3f} ({fs[0]:.3f}–{fs[1]:.3f}) | "
                    f"{r['central_accuracy']:.3f} ({cs[0]:.3f}–{cs[1]:.3f}) |\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xs = [r["target_epsilon"] if r["target_epsilon"] is not None else 16.0 for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["federated_accuracy"] for r in rows], "o-", label="federated (3 hospitals, DP-SGD + SecAgg+)")
    ax.plot(xs, [r["central_accuracy"] for r in rows], "s--", label="central (pooled rows, same DP-SGD)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:g}" if x != 16.0 else "∞" for x in xs])
    ax.set_xlabel("ε per hospital data set (δ = 1e-5)")
    ax.set_ylabel("test accuracy (114 held-out rows)")
    ax.set_title("Breast-cancer MLP: privacy against utility")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, "docs/privacy-utility.png"), dpi=120)


if __name__ == "__main__":
    main()
