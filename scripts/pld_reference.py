#!/usr/bin/env python3
"""Reference values for Confide's PLD accountant, from Google's dp_accounting.

Run by hand (it needs `pip install dp-accounting==0.6.0`); the output is committed
as dp/tests/data/pld_reference.json and dp/tests/pld_reference.rs checks the Rust
accountant (continuous Gaussian PLD, no lattice slack) against it to 0.5%.

    python3 -m venv /tmp/dpa && /tmp/dpa/bin/pip install dp-accounting==0.6.0
    /tmp/dpa/bin/python scripts/pld_reference.py > dp/tests/data/pld_reference.json
"""
import importlib.metadata as md
import json
import platform
import statistics
import sys
import time

import dp_accounting as dpa
from dp_accounting import dp_event as E

NR = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE


def event(q, z):
    g = E.GaussianDpEvent(z)
    return g if q == 1.0 else E.PoissonSampledDpEvent(q, g)


def pld_epsilon(q, z, steps, delta):
    acc = dpa.pld.PLDAccountant(neighboring_relation=NR)  # interval 1e-4, connect-the-dots
    acc.compose(event(q, z), steps)
    return acc.get_epsilon(delta)


def main():
    epsilons = []
    for q in [0.001, 0.01, 0.05, 0.2, 1.0]:
        for z in [0.8, 1.1, 2.0, 5.0]:
            for t in [1, 10, 100, 1000]:
                for d in [1e-5, 1e-6]:
                    eps = pld_epsilon(q, z, t, d)
                    epsilons.append({"q": q, "z": z, "steps": t, "delta": d, "epsilon": float(eps)})

    # Long runs (a job of 20 rounds × 5 epochs at q = 0.01 is 10^4 steps;
    # specs allow up to 10^7): the regime the grid above stops short of
    # (found by review).
    long_runs = []
    for q, z, t, d in [(0.01, 1.1, 10_000, 1e-5), (0.001, 1.0, 100_000, 1e-5), (0.001, 0.8, 500_000, 1e-5)]:
        long_runs.append({"q": q, "z": z, "steps": t, "delta": d, "epsilon": float(pld_epsilon(q, z, t, d))})

    times = []
    for _ in range(5):
        start = time.perf_counter()
        pld_epsilon(0.01, 1.1, 1000, 1e-5)
        times.append((time.perf_counter() - start) * 1e3)

    json.dump(
        {
            "generator": "scripts/pld_reference.py",
            "dp_accounting": md.version("dp-accounting"),
            "python": platform.python_version(),
            "neighboring_relation": "add_or_remove_one",
            "value_discretization_interval": 1e-4,
            "epsilons": epsilons,
            "long_runs": long_runs,
            "dp_accounting_pld_ms_q0.01_z1.1_steps1000": statistics.median(times),
        },
        sys.stdout,
        indent=1,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
