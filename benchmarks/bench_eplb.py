"""Expert placement at DeepSeek-V3 scale: raymoe.eplb vs DeepSeek's published EPLB, side by side.

    .venv/bin/python benchmarks/bench_eplb.py [--repeats 3] [--layers 58] [--write]   # --write: into docs/BENCHMARKS.md

Synthetic loads: 58 MoE layers x 256 experts, per-layer Zipf-skewed token counts (exponent 0.6,
1.0, 1.4, experts shuffled per layer), and a drifted copy (each expert's load times a log-normal
factor, sigma 0.25: a modest drift between two re-plans). Imbalance = mean over layers of the
busiest GPU's tokens / the mean GPU's, tokens split evenly over replicas; the node bound (for
plans that keep each expert group on one node) is the best any such plan can do, from enumerating
every way to put the groups onto the nodes. "moved" = fraction of all slots whose expert changes
when re-planning for the drifted load; a fresh plan is shown as it comes and after the best
relabelling of its GPUs (Hungarian matching, nodes matched as wholes for node-grouped plans).
Times are medians of process CPU time (single-threaded, so other jobs on a shared box do not
inflate them; wall-clock medians are printed next to them).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_block import write_block  # noqa: E402
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
    mode = "hierarchical" if NUM_GROUPS % nodes == 0 else "global"  # the baseline's own rule
    return Placement.from_phy2log(phy, NUM_EXPERTS, nodes, gpn, k, mode)


def relabelled_moves(new: Placement, old: Placement) -> int:
    """Slots whose expert changes from `old` to `new` once new's GPUs are relabelled to keep the most
    replicas where they are (slots inside a GPU reorder freely). A node-grouped plan keeps its
    nodes whole: nodes are matched to nodes, GPUs to GPUs inside each matched pair."""
    nodes = new.num_nodes if new.mode == "hierarchical" else 1
    p, per_node = new.num_gpus, new.num_gpus // nodes
    kept = 0
    for layer in range(new.num_layers):
        on_new, on_old = (
            np.stack([np.bincount(g, minlength=new.num_experts) for g in plan.phy2log[layer].reshape(p, -1)])
            for plan in (new, old)
        )
        # replicas GPU a of `new` and GPU c of `old` share: sum over experts of the smaller count
        top = int(max(on_new.max(), on_old.max()))
        shared = sum((on_new >= t).astype(np.float64) @ (on_old >= t).T for t in range(1, top + 1))
        blocks = shared.reshape(nodes, per_node, nodes, per_node).transpose(0, 2, 1, 3)
        node_kept = np.empty((nodes, nodes))
        for a in range(nodes):
            for c in range(nodes):
                r, q = linear_sum_assignment(blocks[a, c], maximize=True)
                node_kept[a, c] = blocks[a, c][r, q].sum()
        r, q = linear_sum_assignment(node_kept, maximize=True)
        kept += int(node_kept[r, q].sum())
    return new.phy2log.size - kept


def node_bound(load: np.ndarray, nodes: int) -> float:
    """Mean over layers of the lowest busiest-node / mean-node load over every equal split of the
    expert groups onto the nodes: no plan that keeps each group on one node balances better."""
    group_load = load.reshape(load.shape[0], NUM_GROUPS, -1).sum(-1)
    per_node = NUM_GROUPS // nodes

    def splits(rest: list[int]) -> list[list[list[int]]]:
        if not rest:
            return [[]]
        first, others = rest[0], rest[1:]
        out = []
        for mates in itertools.combinations(others, per_node - 1):
            left = [g for g in others if g not in mates]
            out += [[[first, *mates], *tail] for tail in splits(left)]
        return out

    onehot = np.zeros((0, NUM_GROUPS, nodes))
    for split in splits(list(range(NUM_GROUPS))):
        m = np.zeros((1, NUM_GROUPS, nodes))
        for node, groups in enumerate(split):
            m[0, groups, node] = 1.0
        onehot = np.concatenate([onehot, m])
    node_load = np.einsum("lg,sgn->lsn", group_load, onehot)  # [layers, splits, nodes]
    best = node_load.max(-1).min(-1)
    return float((best / (group_load.sum(1) / nodes)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=58)
    parser.add_argument("--write", action="store_true", help="write the tables into docs/BENCHMARKS.md")
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
        slots = ours.phy2log.size
        rows.append({
            "unit": unit, "zipf": skew, "mode": ours.mode,
            "ds_imb": ds.imbalance(load), "ours_imb": ours.imbalance(load),
            "bound": node_bound(load, nodes) if ours.mode == "hierarchical" else None,
            "ds_ms": ds_t * 1e3, "ours_ms": ours_t * 1e3, "ds_wall": ds_w * 1e3, "ours_wall": ours_w * 1e3,
            "ds_moved": ds_drift.num_moves_from(ds) / slots,
            "ds_relabelled": relabelled_moves(ds_drift, ds) / slots,
            "fresh_moved": fresh.num_moves_from(ours) / slots,
            "fresh_relabelled": relabelled_moves(fresh, ours) / slots,
            "replan_moved": replan.num_moves_from(ours) / slots,
            "ds_drift_imb": ds_drift.imbalance(drift), "fresh_imb": fresh.imbalance(drift),
            "replan_imb": replan.imbalance(drift), "replan_ms": replan_t * 1e3, "replan_wall": replan_w * 1e3,
        })

    out = [
        f"Measured {time.strftime('%Y-%m-%d')}: {args.layers} layers, medians of {args.repeats} runs; "
        f"{platform.machine()}, {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f} at the start), "
        f"numpy {np.__version__}, torch {torch.__version__}, 1 thread.",
        "",
        "| unit | Zipf | mode | imbalance DeepSeek EPLB | imbalance raymoe | node bound | plan CPU time DeepSeek / raymoe (ms) | wall (ms) |",
        "|---|---:|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        bound = "-" if r["bound"] is None else f"{r['bound']:.3f}"
        out.append(f"| {r['unit']} | {r['zipf']} | {r['mode']} | {r['ds_imb']:.3f} | {r['ours_imb']:.3f} | {bound} | "
                   f"{r['ds_ms']:.0f} / {r['ours_ms']:.0f} | {r['ds_wall']:.0f} / {r['ours_wall']:.0f} |")
    out += [
        "",
        "| unit | Zipf | slots moved: DeepSeek fresh, as planned / best relabelling | raymoe fresh, as planned / best relabelling | raymoe re-plan | drift imbalance: DeepSeek fresh / raymoe fresh / raymoe re-plan | re-plan CPU time (ms) | wall (ms) |",
        "|---|---:|---|---|---:|---|---:|---:|",
    ]
    for r in rows:
        out.append(f"| {r['unit']} | {r['zipf']} | {r['ds_moved']:.0%} / {r['ds_relabelled']:.0%} | "
                   f"{r['fresh_moved']:.0%} / {r['fresh_relabelled']:.0%} | {r['replan_moved']:.0%} | "
                   f"{r['ds_drift_imb']:.3f} / {r['fresh_imb']:.3f} / {r['replan_imb']:.3f} | "
                   f"{r['replan_ms']:.0f} | {r['replan_wall']:.0f} |")

    # Per-step replica choice before a layer's all-to-all: 16k tokens x 9 experts on 32 GPUs, the
    # plan made from the expected load, the step's routing a sample of it.
    out += [
        "",
        "| replica choice, 16384 tokens x 9 experts, 4x8 GPUs | Zipf | slots per GPU | mode | CPU time (ms, median) | wall (ms) | busiest GPU tokens | mean GPU tokens |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
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
                out.append(f"| | {skew} | {k} | {mode} | {t * 1e3:.1f} | {w * 1e3:.1f} | {int(counts.max())} | "
                           f"{float(counts.float().mean()):.0f} |")
    text = "\n".join(out)
    print("\n" + text)
    if args.write:
        print(f"bench_eplb: wrote {write_block('bench_eplb.py', text)}")


if __name__ == "__main__":
    main()
