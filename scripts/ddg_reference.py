#!/usr/bin/env python3
"""Reference values for Confide's distributed discrete Gaussian (dp/src/ddg.rs).

The RDP of the distributed discrete Gaussian comes from its authors' own code:
google-research/federated, distributed_dp/accounting_utils.py (Kairouz, Liu,
Steinke, ICML 2021), at commit a5af8c4433c9ee2d2b1565f1bcc68c89e2000a6b. That
module imports tensorflow_privacy only to convert RDP to epsilon; this script
gives it dp_accounting's conversion instead (the same bound), so TensorFlow is not
needed. The output is committed as dp/tests/data/ddg_reference.json and checked by
dp/tests/ddg_reference.rs.

    git clone https://github.com/google-research/federated /tmp/federated
    git -C /tmp/federated checkout a5af8c4433c9ee2d2b1565f1bcc68c89e2000a6b
    python3 -m venv /tmp/dpa && /tmp/dpa/bin/pip install dp-accounting==0.6.0 scipy
    /tmp/dpa/bin/python scripts/ddg_reference.py /tmp/federated > dp/tests/data/ddg_reference.json

Confide's calibration (the part of this script that is Confide's, not the
authors'): the authors' heuristic scale for `max_parties` at k = 4, capped so that
the integer local sigma stays at most 2^26 (the sampler's limit), and the local
sigma rounded up to an integer. The authors' epsilon is then evaluated at exactly
that integer sigma, with the honest parties as the number of noise shares.

Confide rotates vectors longer than 2^14 values in blocks of 2^14 (padded to a
multiple of the block, not to a power of two; ROTATION_BLOCK in dp/src/ddg.rs):
the heuristic's flattening length is then the block's, and the accounting's
dimension the padded length.
"""
import importlib.metadata as md
import json
import math
import sys
import types

import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant as rdp_mod

captured = {}
SPOT_ORDERS = [2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128, 256]
ROTATION_BLOCK = 1 << 14


def padded_len(dim):
    """Confide's rotated length: a power of two up to a block, a multiple of it above."""
    if dim <= ROTATION_BLOCK:
        return 1 << (dim - 1).bit_length()
    return -(-dim // ROTATION_BLOCK) * ROTATION_BLOCK


def get_privacy_spent(orders, rdp, target_delta):
    captured["rdp"] = [float(r) for r in rdp]
    eps, order = rdp_mod.compute_epsilon(orders, rdp, target_delta)
    return eps, None, order


def main():
    repo = sys.argv[1]
    stub = types.ModuleType("tensorflow_privacy")
    stub.get_privacy_spent = get_privacy_spent
    stub.compute_rdp = None
    sys.modules["tensorflow_privacy"] = stub
    sys.path.insert(0, repo + "/distributed_dp")
    import accounting_utils as au

    cases = []
    # 16 to 32 bits: the practical settings (large sigma, tau = 0); 4 and 6 bits
    # at d = 100: sigma of a few lattice units, where tau and the l1 term count.
    # A million values: padded to 62 blocks (1,015,808), not to 2^20.
    grid = [(dim, bits) for dim in [1000, 65536, 1_000_000] for bits in [16, 20, 32]] + [(100, 4), (100, 6)]
    for dim, bits in grid:
        if True:
            for (n_max, n_honest) in [(5, 5), (10, 7)]:
                for z in [0.5, 1.0, 2.0]:
                    for beta in [0.0, math.exp(-0.5)]:
                        for rounds in [1, 50]:
                            c = 1.0
                            padded = padded_len(dim)
                            flattened = min(padded, ROTATION_BLOCK)
                            local_stddev = z * c / math.sqrt(n_honest)
                            scale = au.heuristic_scale_factor(local_stddev, c, bits, n_max, flattened, 4.0)
                            scale = min(scale, 2.0**26 / local_stddev)
                            sigma_int = math.ceil(local_stddev * scale)
                            eps, order = au.ddgauss_epsilon(
                                gamma=1.0 / scale,
                                local_stddev=sigma_int / scale,
                                num_clients=n_honest,
                                l2_sens=c,
                                beta=beta,
                                dim=padded,
                                q=1.0,
                                steps=rounds,
                                delta=1e-5,
                            )
                            cases.append({
                                "clip": c, "noise_multiplier": z, "dim": dim, "bits": bits,
                                "max_parties": n_max, "honest_parties": n_honest, "beta": beta,
                                "rounds": rounds, "delta": 1e-5,
                                "scale": float(scale), "local_sigma": sigma_int,
                                "epsilon": float(eps), "order": float(order),
                            })
                            if rounds == 1:
                                # One round's RDP at a spread of orders.
                                cases[-1]["rdp_at"] = {
                                    str(o): captured["rdp"][list(au.RDP_ORDERS).index(o)] for o in SPOT_ORDERS
                                }
    # DP-SGD with discrete Gaussian noise: the Poisson-subsampled discrete
    # Gaussian, accounted with the authors' `compute_rdp_dgaussian` at tau = 0
    # (their Zhu-Wang Theorem 5 route), converted with dp_accounting.
    subsampled = []
    for q in [0.001, 0.01, 0.05, 0.2]:
        for z in [0.6, 1.0, 1.1, 2.0, 5.0]:
            for steps in [1, 100, 1000, 10000]:
                for delta in [1e-5, 1e-6]:
                    rdp = au.compute_rdp_dgaussian(q, 1.0 / z, 1.0 / z, 0.0, 1, steps, au.RDP_ORDERS)
                    eps, order = rdp_mod.compute_epsilon(au.RDP_ORDERS, rdp, delta)
                    entry = {"q": q, "noise_multiplier": z, "steps": steps, "delta": delta,
                             "epsilon": float(eps), "order": float(order)}
                    if steps == 1 and delta == 1e-5:
                        entry["rdp_at"] = {str(o): float(rdp[list(au.RDP_ORDERS).index(o)]) for o in SPOT_ORDERS}
                    subsampled.append(entry)
    # Regimes the grid above stops short of (found by review): large q,
    # small z (one step), heavy noise over 10^6 steps (where the bound's
    # floor shows), 10^7 steps, and δ up to the 1e-3 specs accept.
    edges = []
    for q, z, steps, delta in [(0.5, 0.8, 10, 1e-5), (0.5, 2.0, 100, 1e-3), (0.01, 20.0, 1_000_000, 1e-5),
                               (0.2, 0.4, 1, 1e-5), (0.001, 1.0, 10_000_000, 1e-6)]:
        rdp = au.compute_rdp_dgaussian(q, 1.0 / z, 1.0 / z, 0.0, 1, steps, au.RDP_ORDERS)
        eps, order = rdp_mod.compute_epsilon(au.RDP_ORDERS, rdp, delta)
        edges.append({"q": q, "noise_multiplier": z, "steps": steps, "delta": delta,
                      "epsilon": float(eps), "order": float(order)})
    json.dump({
        "generator": "scripts/ddg_reference.py",
        "authors_code": "google-research/federated@a5af8c4433c9ee2d2b1565f1bcc68c89e2000a6b distributed_dp/accounting_utils.py",
        "dp_accounting": md.version("dp-accounting"),
        "orders": [float(o) for o in au.RDP_ORDERS],
        "cases": cases,
        "subsampled_discrete_gaussian": subsampled,
        "subsampled_discrete_gaussian_edges": edges,
    }, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
