"""Expert placement at DeepSeek-V3 scale: raymoe.eplb vs DeepSeek's published EPLB, side by side.

    .venv/bin/python benchmarks/bench_eplb.py [--repeats 3] [--layers 58]

Synthetic loads: 58 MoE layers x 256 experts, per-layer Zipf-skewed token counts (exponent 0.6,
1.0, 1.4, experts shuffled per layer), and a drifted copy (each expert's load times a log-normal
factor, sigma 0.25: a modest drift between two re-plans). Imbalance = mean over layers of the
busiest GPU's tokens / the mean GPU's, tokens split evenly over replicas. "moved" = fraction of
all slots whose expert changes when re-planning for the drifted load. Times are medians of
process CPU time (single-threaded, so other jobs on a shared box do not inflate them; wall-clock
medians are printed next to them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eplb_baseline import rebalance_experts  # noqa: E402

from raymoe.eplb import Placement, choose_replicas, gpu_token_counts, rebalance  # noqa: E402

T = TypeVar("T")
os.environ.setdefault("OMP_NUM_THREADS", "1")

UNITS = {  # name: (nodes, gpus per node, slots per GPU)
    "prefill 4x8, 9 slots": (4, 8, 9),
    "decode 40x8, 1 slot": (40, 8, 1),
    "prefill 4x8, 16 slots": (4, 8, 16),
}
NUM_EXPERTS, NUM_GROUPS, TOKENS = 256, 8, 16384 * 8


def zipf_load(layers: int, skew: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = 1.0 / np.arange(1, NUM_EXPERTS + 1) ** skew
    out = np.stack([base[rng.permutation(NUM_EXPERTS)] for _ in range(layers)])
    return out / out.sum(1, keepdims=True) * TOKENS


def timed(repeats: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float, float]:
    """(result, median CPU seconds, median wall seconds) over `repeats` calls."""
    cpu: list[float] = []
    wall: list[float] = []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn(*args, **kwargs)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
    return result, statistics.median(cpu), statistics.median(wall)


def base_plan(w: np.ndarray, nodes: int, gpn: int, k: int) -> Placement:
    phy = rebalance_experts(w, nodes * gpn * k, NUM_GROUPS, nodes, nodes * gpn)
    return Placement.from_phy2log(phy, NUM_EXPERTS, nodes, gpn, k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=58)
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = []
    cases = [(u, s) for u in UNITS for s in (0.6, 1.0, 1.4)]
    for unit, skew in tqdm(cases, desc="eplb", unit="case"):
        nodes, gpn, k = UNITS[unit]
        load = zipf_load(args.layers, skew, seed=int(skew * 10))
        drift = load * np.random.default_rng(7).lognormal(0.0, 0.25, load.shape)

        ds, ds_t, ds_w = timed(args.repeats, base_plan, load, nodes, gpn, k)
        ds_drift = base_plan(drift, nodes, gpn, k)
        ours, ours_t, ours_w = timed(args.repeats, rebalance, load, nodes, gpn, k, NUM_GROUPS)
        fresh = rebalance(drift, nodes, gpn, k, NUM_GROUPS)
        replan, replan_t, replan_w = timed(args.repeats, rebalance, drift, nodes, gpn, k, NUM_GROUPS, previous=ours)
        rows.append({
            "unit": unit, "zipf": skew, "regime": ours.regime,
            "ds_imb": ds.imbalance(load), "ours_imb": ours.imbalance(load),
            "ds_moved": ds_drift.num_moves_from(ds) / ds.phy2log.size,
            "fresh_moved": fresh.num_moves_from(ours) / ours.phy2log.size,
            "replan_moved": replan.num_moves_from(ours) / ours.phy2log.size,
            "replan_imb": replan.imbalance(drift), "fresh_imb": fresh.imbalance(drift),
            "ds_ms": ds_t * 1e3, "ours_ms": ours_t * 1e3, "replan_ms": replan_t * 1e3,
            "wall_ms": (ds_w * 1e3, ours_w * 1e3, replan_w * 1e3),
        })

    print("\n| unit | Zipf | regime | imbalance DeepSeek EPLB | imbalance raymoe | re-plan after drift: slots moved, DeepSeek / raymoe fresh / raymoe re-plan | drift imbalance: re-plan / fresh | plan CPU time DeepSeek / raymoe / re-plan (ms) | wall (ms) |")
    print("|---|---:|---|---:|---:|---|---|---|---|")
    for r in rows:
        print(f"| {r['unit']} | {r['zipf']} | {r['regime']} | {r['ds_imb']:.3f} | {r['ours_imb']:.3f} | "
              f"{r['ds_moved']:.0%} / {r['fresh_moved']:.0%} / {r['replan_moved']:.0%} | "
              f"{r['replan_imb']:.3f} / {r['fresh_imb']:.3f} | {r['ds_ms']:.0f} / {r['ours_ms']:.0f} / {r['replan_ms']:.0f} | "
              + " / ".join(f"{x:.0f}" for x in r["wall_ms"]) + " |")

    # Per-step replica choice before a layer's all-to-all: 16k tokens x 9 experts on 32 GPUs, the
    # plan made from the expected load, the step's routing a sample of it.
    print("\n| replica choice, 16384 tokens x 9 experts, 4x8 GPUs | Zipf | slots per GPU | mode | CPU time (ms, median) | wall (ms) | busiest GPU tokens | mean GPU tokens |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for skew in (0.6, 1.0, 1.4):
        load = zipf_load(1, skew, seed=3)
        g = torch.Generator().manual_seed(0)
        ids = torch.multinomial(torch.as_tensor(load[0]).expand(16384, NUM_EXPERTS), 9, generator=g)
        for k in (9, 16):
            plan = rebalance(load, 4, 8, k, NUM_GROUPS)
            l2p, rc = plan.layer_tensors(0)
            for mode in ("static", "balanced"):
                slots, t, w = timed(max(7, args.repeats), choose_replicas, l2p, rc, k, ids, mode, num_gpus=32)
                counts = gpu_token_counts(slots, k, 32)
                print(f"| | {skew} | {k} | {mode} | {t * 1e3:.1f} | {w * 1e3:.1f} | {int(counts.max())} | "
                      f"{float(counts.float().mean()):.0f} |")


if __name__ == "__main__":
    main()
