#!/usr/bin/env python3
"""Reference values for Confide's privacy accountant, from Google's dp_accounting.

Run by hand (it needs `pip install dp-accounting==0.6.0`); the output is committed
as dp/tests/data/dp_accounting_reference.json and dp/tests/reference.rs checks the
Rust accountant against it (epsilon to 0.5%, per-order RDP to 1e-9 relative).

    python3 -m venv /tmp/dpa && /tmp/dpa/bin/pip install dp-accounting==0.6.0
    /tmp/dpa/bin/python scripts/dp_reference.py > dp/tests/data/dp_accounting_reference.json
"""
import importlib.metadata as md
import json
import logging
import platform
import statistics
import sys
import time

import dp_accounting as dpa
from dp_accounting import dp_event as E
from dp_accounting.rdp import rdp_privacy_accountant as rdp_mod

ORDERS = list(rdp_mod.DEFAULT_RDP_ORDERS)
NR = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE


def finite_or_inf(x):
    """JSON has no infinity: orders where dp_accounting's series does not
    converge (it returns inf and skips them) are written as "inf"."""
    x = float(x)
    return x if x != float("inf") else "inf"


def event(q, z):
    g = E.GaussianDpEvent(z)
    return g if q == 1.0 else E.PoissonSampledDpEvent(q, g)


def rdp_accountant(q, z, steps):
    acc = dpa.rdp.RdpAccountant(orders=ORDERS, neighboring_relation=NR)
    acc.compose(event(q, z), steps)
    return acc


def main():
    # dp_accounting warns at every order whose series does not converge.
    logging.disable(logging.WARNING)
    qs = [0.001, 0.01, 0.05, 0.2, 0.5, 1.0]
    zs = [0.5, 0.8, 1.1, 2.0, 5.0]
    steps = [1, 10, 100, 1000, 10000]
    deltas = [1e-5, 1e-6]

    per_step = []  # the RDP vector of one step, order by order
    for q in qs:
        for z in zs:
            per_step.append({"q": q, "z": z, "rdp": [finite_or_inf(r) for r in rdp_accountant(q, z, 1).rdp]})

    epsilons = []
    for q in qs:
        for z in zs:
            for t in steps:
                acc = rdp_accountant(q, z, t)
                for d in deltas:
                    eps, order = acc.get_epsilon_and_optimal_order(d)
                    epsilons.append({"q": q, "z": z, "steps": t, "delta": d, "epsilon": float(eps), "order": float(order)})

    calibrations = []
    for q, t in [(0.01, 1000), (0.02, 500), (0.1, 100), (1.0, 50)]:
        for target in [0.5, 1.0, 2.0, 4.0, 8.0]:
            d = 1e-5
            z = dpa.calibrate_dp_mechanism(
                lambda: dpa.rdp.RdpAccountant(orders=ORDERS, neighboring_relation=NR),
                lambda z, q=q, t=t: E.SelfComposedDpEvent(event(q, z), t),
                target,
                d,
                bracket_interval=dpa.LowerEndpointAndGuess(0.01, 1.0),
                tol=1e-6,
            )
            calibrations.append({"q": q, "steps": t, "target_epsilon": target, "delta": d, "noise_multiplier": float(z)})

    # dp_accounting's time for the accountant benchmark's case (median of 20).
    times = []
    for _ in range(20):
        start = time.perf_counter()
        rdp_accountant(0.01, 1.1, 1000).get_epsilon(1e-5)
        times.append((time.perf_counter() - start) * 1e3)

    json.dump(
        {
            "generator": "scripts/dp_reference.py",
            "dp_accounting": md.version("dp-accounting"),
            "python": platform.python_version(),
            "neighboring_relation": "add_or_remove_one",
            "orders": ORDERS,
            "per_step_rdp": per_step,
            "epsilons": epsilons,
            "calibrations": calibrations,
            "dp_accounting_ms_q0.01_z1.1_steps1000": statistics.median(times),
        },
        sys.stdout,
        indent=1,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
