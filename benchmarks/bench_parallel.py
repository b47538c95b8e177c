"""Expert-parallel unit on a simulated cluster vs the single-process engine, and the projection to V3's units.

Measured (2 nodes x 4 simulated GPUs: CPU workers, gloo, one torch thread each; TP2 x DP4, EP8
with 9 slots per GPU, tiny default checkpoint, float32): median step time of the unit vs the
single-process reference (`DataParallelRunner`, the same 4 DP ranks run one after the other in one
process) on the same batches, overlap on vs off (interleaved repeats), hidden-state bytes that
cross nodes with hierarchical (node-limited) vs flat exchange, and the busiest GPU's (token,
expert) pairs per MoE layer with balanced vs static replica choice.

Projected (on paper, from V3's shapes, Monte-Carlo group-limited routing): bytes per token over
IB and NVLink for the 4-node prefill and 40-node decode units, flat vs hierarchical, and per-step
expert batch sizes. See docs/PARALLEL.md.

    python benchmarks/bench_parallel.py            # prints the tables
    python benchmarks/bench_parallel.py --write    # also writes them into docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
from docs_block import write_block

from raymoe.engine.executor import ModelInput
from raymoe.engine.model_runner import DataParallelRunner
from raymoe.model.tiny import default_checkpoint
from raymoe.model.weights import load_checkpoint
from raymoe.parallel.config import ParallelConfig
from raymoe.parallel.executor import initial_placement
from raymoe.parallel.testing import BLOCKS_PER_SEQ, make_input, simulated_cluster, tiny_unit

BLOCK = 16


def batches(dp: int, vocab: int, prefill_seqs: int, prefill_len: int, decode_seqs: int, context: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)

    def rand(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    def batch(tokens: list[list[int]], starts: list[int], first_seq: int) -> ModelInput:
        return make_input(tokens, starts, block_size=BLOCK, first_seq=first_seq)

    warm = [batch([rand(context) for _ in range(decode_seqs)], [0] * decode_seqs, 0) for _ in range(dp)]
    decode = [batch([rand(1) for _ in range(decode_seqs)], [context] * decode_seqs, 0) for _ in range(dp)]
    prefill = [
        batch([rand(prefill_len) for _ in range(prefill_seqs)], [0] * prefill_seqs, decode_seqs) for _ in range(dp)
    ]
    return {"warm": warm, "decode": decode, "prefill": prefill}


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(args: argparse.Namespace) -> dict[str, Any]:
    path = str(default_checkpoint())
    with simulated_cluster():
        cfg = ParallelConfig(nodes=2, gpus_per_node=4, attention_tp=2, slots_per_gpu=9, node_limited=True)
        n_blocks = (args.decode_seqs + args.prefill_seqs) * BLOCKS_PER_SEQ
        print(f"bench_parallel: starting a {cfg.nodes}x{cfg.gpus_per_node} unit (TP{cfg.attention_tp}) on a simulated cluster")
        unit = tiny_unit(cfg, kv_cache_tokens=n_blocks * BLOCK, block_size=BLOCK)
        model = load_checkpoint(path, progress=False)
        torch.set_num_threads(1)  # the reference gets one core, like each worker
        ref = DataParallelRunner(model, unit.dp_size, n_blocks, BLOCK)
        b = batches(unit.dp_size, model.config.vocab_size, args.prefill_seqs, args.prefill_len, args.decode_seqs, args.context)
        unit.execute(b["warm"])
        ref.execute(b["warm"])
        out: dict[str, Any] = {"config": cfg, "topology": unit.topo.describe(), "tokens": {}}
        for kind in ("prefill", "decode"):
            inputs = b[kind]
            out["tokens"][kind] = sum(i.num_tokens for i in inputs)
            assert [o.token_ids for o in unit.execute(inputs)] == [o.token_ids for o in ref.execute(inputs)]
            t_ref, t_off, t_on = [], [], []
            for _ in range(args.repeats):  # interleaved: the box's noise hits all three alike
                t_ref.append(timed(lambda inputs=inputs: ref.execute(inputs)))
                unit.set_options(overlap=False)
                t_off.append(timed(lambda inputs=inputs: unit.execute(inputs)))
                unit.set_options(overlap=True)
                t_on.append(timed(lambda inputs=inputs: unit.execute(inputs)))
            unit.set_options(overlap=False)
            traffic = {}
            for hier in (True, False):
                unit.set_options(node_limited=hier)
                unit.execute(inputs)
                s = unit.last_stats
                traffic[hier] = (s.bytes_inter_node, s.bytes_intra_node)
            unit.set_options(node_limited=True)
            balance = {}
            uniform = unit.placement
            for plan in ("uniform", "measured"):
                for choice in ("static", "balanced"):
                    unit.set_options(replica_choice=choice)
                    unit.execute(inputs)
                    balance[plan, choice] = (unit.last_stats.busiest_gpu_tokens, unit.last_stats.mean_gpu_tokens)
                if plan == "uniform":  # what the load tracker would do: re-plan from the recorded counts (this batch's)
                    load = unit.expert_load()
                    unit.migrate(initial_placement(unit.topo, unit.model_config, True, load=load))
            unit.migrate(uniform)
            out[kind] = {
                "ref": statistics.median(t_ref),
                "off": statistics.median(t_off),
                "on": statistics.median(t_on),
                "price": statistics.median([a / r for a, r in zip(t_off, t_ref, strict=True)]),
                "overlap": statistics.median([a / c for a, c in zip(t_off, t_on, strict=True)]),
                "traffic": traffic,
                "balance": balance,
            }
            print(f"bench_parallel: {kind} done")
        unit.shutdown()
        return out

# --- projection to DeepSeek-V3's units (on paper) ------------------------------------------------


def project(
    nodes: int, gpn: int, samples: int = 20000, hidden: int = 7168, experts: int = 256, groups: int = 8,
    topk_group: int = 4, top_k: int = 8, seed: int = 0,
) -> dict[str, float]:
    """Per token: rows sent over IB / NVLink for dispatch, flat vs hierarchical, with group-limited routing.

    Placement: experts of a group stay on the nodes of that group (groups packed on nodes when
    nodes <= groups, else each group over nodes/groups nodes), spread round-robin over GPUs.
    """
    rng = np.random.default_rng(seed)
    world = nodes * gpn
    per_group = experts // groups
    if nodes <= groups:
        node_of_expert = (np.arange(experts) // per_group) * nodes // groups
        gpu_of_expert = node_of_expert * gpn + (np.arange(experts) % per_group) % gpn
    else:  # one expert per GPU over the first `experts` GPUs, groups on consecutive nodes
        gpu_of_expert = np.arange(experts) * (world // experts) if world >= experts else np.arange(experts) % world
        node_of_expert = gpu_of_expert // gpn
    ib_flat = nv_flat = ib_hier = nv_hier = 0
    for _ in range(samples):
        src = int(rng.integers(world))
        sn, sl = divmod(src, gpn)
        gs = rng.choice(groups, topk_group, replace=False)
        cand = (gs[:, None] * per_group + np.arange(per_group)).reshape(-1)
        chosen = rng.choice(cand, top_k, replace=False)
        dst = set(gpu_of_expert[chosen].tolist())
        dst.discard(src)
        ib_flat += sum(1 for d in dst if d // gpn != sn)
        nv_flat += sum(1 for d in dst if d // gpn == sn)
        for n in {d // gpn for d in dst}:
            inside = {d for d in dst if d // gpn == n}
            if n != sn:
                ib_hier += 1
            nv_hier += len(inside - {n * gpn + sl})
    dispatch_bytes = hidden * 1 + hidden // 128 * 4  # FP8 + one float scale per 128 values
    combine_bytes = hidden * 2  # BF16
    per = dispatch_bytes + combine_bytes
    return {
        "ib_rows_flat": ib_flat / samples, "nv_rows_flat": nv_flat / samples,
        "ib_rows_hier": ib_hier / samples, "nv_rows_hier": nv_hier / samples,
        "ib_kb_flat": ib_flat / samples * per / 1024, "nv_kb_flat": nv_flat / samples * per / 1024,
        "ib_kb_hier": ib_hier / samples * per / 1024, "nv_kb_hier": nv_hier / samples * per / 1024,
    }


def table(m: dict[str, Any] | None, proj: dict[str, dict[str, float]]) -> str:
    lines = []
    if m is not None:
        lines += [
            f"Measured: {m['topology']}; per step {m['tokens']['prefill']} prefill tokens or "
            f"{m['tokens']['decode']} decode tokens over the 4 DP ranks; medians of interleaved repeats. "
            f"{platform.machine()}, {os.cpu_count()} cores (shared), torch {torch.__version__}.",
            "",
            "| batch | single-process step | unit step, overlap off | unit step, overlap on | unit / single (paired) | off / on (paired) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for kind in ("prefill", "decode"):
            r = m[kind]
            lines.append(
                f"| {kind} | {r['ref'] * 1e3:.1f} ms | {r['off'] * 1e3:.1f} ms | {r['on'] * 1e3:.1f} ms | "
                f"{r['price']:.2f}x | {r['overlap']:.2f}x |"
            )
        lines += [
            "",
            "| batch | bytes across nodes, hierarchical | flat | bytes inside nodes, hierarchical | flat |",
            "|---|---:|---:|---:|---:|",
        ]
        for kind in ("prefill", "decode"):
            r = m[kind]
            (hi, hn), (fi, fn) = r["traffic"][True], r["traffic"][False]
            lines.append(
                f"| {kind} | {hi / 1024:.0f} KiB | {fi / 1024:.0f} KiB | {hn / 1024:.0f} KiB | {fn / 1024:.0f} KiB |"
            )
        lines += [
            "",
            "Busiest GPU's (token, expert) pairs per MoE layer and step (mean over GPUs in brackets), under the",
            "uniform-load placement and under a placement re-planned from the counts the unit recorded on that batch:",
            "",
            "| batch | uniform plan, static | uniform plan, balanced | measured plan, static | measured plan, balanced |",
            "|---|---:|---:|---:|---:|",
        ]
        for kind in ("prefill", "decode"):
            b = m[kind]["balance"]
            cells = [f"{b[p, c][0]:.0f} ({b[p, c][1]:.0f})" for p in ("uniform", "measured") for c in ("static", "balanced")]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Projected per token (dispatch FP8 + combine BF16 of V3's 7168-wide hidden state; group-limited top-8 routing):",
        "",
        "| unit | IB rows flat | IB rows hierarchical | NVLink rows flat | NVLink rows hierarchical | IB KiB flat | IB KiB hierarchical |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, p in proj.items():
        lines.append(
            f"| {name} | {p['ib_rows_flat']:.2f} | {p['ib_rows_hier']:.2f} | {p['nv_rows_flat']:.2f} | "
            f"{p['nv_rows_hier']:.2f} | {p['ib_kb_flat']:.1f} | {p['ib_kb_hier']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prefill-seqs", type=int, default=2)
    ap.add_argument("--prefill-len", type=int, default=64)
    ap.add_argument("--decode-seqs", type=int, default=16)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--project-only", action="store_true", help="skip the simulated cluster")
    ap.add_argument("--write", action="store_true", help="write the tables into docs/BENCHMARKS.md")
    args = ap.parse_args(argv)
    proj = {"prefill 4 x 8 (EP32)": project(4, 8), "decode 40 x 8 (EP320)": project(40, 8)}
    m = None if args.project_only else measure(args)
    text = table(m, proj)
    print(text)
    if args.write and m is not None:
        print(f"bench_parallel: wrote {write_block('bench_parallel.py', text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
