"""Live expert migration on a simulated 2 x 4 unit under continuous decode load, and the single-process
runner's load-recording overhead.

Unit (2 nodes x 4 simulated GPUs: CPU workers, gloo, one torch thread each; TP2 x DP4, EP8 with 9
slots per GPU, flat exchange as a decode unit runs; a tiny checkpoint whose gate bias makes experts
0 and 1 win every token): 16 sequences decode through `LLMEngine` while the unit migrates five
times, alternately re-planned from its measured load (`rebalance(expert_load(), previous=placement)`)
and to a fresh plan of the same load (`rebalance` without `previous`: what a planner that ignores
the running placement would move). Every engine step is timed: before any
migration, while a migration stages, the step that commits it, and after. Per migration: copies
and bytes moved (and what the fresh plan would have moved from the same placement), staging time,
steps it spanned, the commit's extra time, and the unit's busiest-GPU / mean (token, expert)
pairs (`last_stats`, mean over steps) before and after.

Single process: decode step time of `LLMEngine` (16 sequences) with the expert-load recorder on
(`MoE.route_observer`) and off, switched every step.

    python benchmarks/bench_migration.py            # prints the tables
    python benchmarks/bench_migration.py --write    # also writes them into docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from docs_block import write_block

from raymoe import LLM, SamplingParams
from raymoe.engine.config import EngineConfig
from raymoe.engine.llm_engine import LLMEngine
from raymoe.eplb import rebalance
from raymoe.model.deepseek_v3 import MoE
from raymoe.model.tiny import default_checkpoint, make_tiny
from raymoe.parallel.config import ParallelConfig
from raymoe.parallel.executor import ExpertParallelExecutor
from raymoe.parallel.migration import plan_migration
from raymoe.parallel.testing import simulated_cluster

BLOCK = 16


@dataclass
class Migration:
    kind: str
    moved: int = 0
    bytes: int = 0
    from_peers: int = 0
    from_disk: int = 0
    fresh_moved: int = 0  # copies a fresh plan of the same load would move from the same placement
    stage_s: float = 0.0
    commit_s: float = 0.0
    staging_steps: list[float] = field(default_factory=list)
    commit_step: float = 0.0
    local_p50: float = 0.0  # median of the 5 steps before begin_migration (the box's load drifts)
    before: float = 0.0  # busiest GPU / mean, mean over the steps before
    after: float = 0.0


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def measure_unit(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="raymoe-bench-migration-"))
    ckpt = make_tiny(tmp / "hot", hot_experts=2, progress=False)
    with simulated_cluster():
        cfg = ParallelConfig(nodes=2, gpus_per_node=4, attention_tp=2, slots_per_gpu=9, node_limited=False)
        engine_cfg = EngineConfig(model=str(ckpt), kv_cache_tokens=args.seqs * 512, block_size=BLOCK)
        print(f"bench_migration: starting a {cfg.nodes}x{cfg.gpus_per_node} unit (TP{cfg.attention_tp}, flat exchange)")
        unit = ExpertParallelExecutor(engine_cfg, cfg)
        engine = LLMEngine(engine_cfg, executor=unit)
        g = torch.Generator().manual_seed(0)
        vocab = engine.model_config.vocab_size
        params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
        for i in range(args.seqs):
            engine.add_request(str(i), torch.randint(3, vocab, (16,), generator=g).tolist(), params)

        def step() -> tuple[float, float]:
            t0 = time.perf_counter()
            engine.step()
            s = unit.last_stats
            return time.perf_counter() - t0, s.busiest_gpu_tokens / max(s.mean_gpu_tokens, 1e-9)

        for _ in range(args.warmup):  # prefill, then decode until the load window holds decode steps
            step()
        base = [step() for _ in range(args.steps)]
        baseline = [t for t, _ in base]
        ratio_before = statistics.mean(r for _, r in base)
        migrations: list[Migration] = []
        after: list[float] = []
        recent = baseline[-5:]
        n_group = engine.model_config.n_group
        for kind in ["re-plan", "fresh plan"] * args.rounds + ["re-plan"]:
            load = unit.expert_load()
            current = unit.placement
            replan = rebalance(load, 2, 4, 9, n_group, mode="global", previous=current)
            fresh = rebalance(load, 2, 4, 9, n_group, mode="global")
            target = replan if kind == "re-plan" else fresh
            m = Migration(kind, before=ratio_before, local_p50=statistics.median(recent))
            m.fresh_moved = plan_migration(current.phy2log, fresh.phy2log, unit.topo, 1, 1).copies
            version = unit.placement_version
            unit.begin_migration(target)
            while unit.placement_version == version:
                staged = unit.migration_status().pending_commit  # a status poll between steps, as a server does
                t, _ = step()
                if unit.placement_version != version:
                    m.commit_step = t
                elif not staged:
                    m.staging_steps.append(t)
            res = unit.last_migration
            assert res is not None
            m.moved, m.bytes, m.from_peers, m.from_disk = res.moved, res.bytes, res.from_peers, res.from_disk
            m.stage_s, m.commit_s = res.stage_s, res.commit_s
            post = [step() for _ in range(args.steps)]
            after += [t for t, _ in post]
            recent = [t for t, _ in post[-5:]]
            m.after = ratio_before = statistics.mean(r for _, r in post)
            migrations.append(m)
            print(f"bench_migration: {kind}: {m.moved} copies, commit step {m.commit_step * 1e3:.0f} ms")
        topo = unit.topo.describe()
        unit.shutdown()
        return {"baseline": baseline, "after": after, "migrations": migrations, "topology": topo, "seqs": args.seqs}

def measure_recorder(args: argparse.Namespace) -> dict[str, float]:
    """Decode step time of the single-process engine with expert-load recording on and off, switched every
    step (pairs of adjacent steps, the order alternating), so the box's drifting load hits both alike."""
    torch.set_num_threads(1)
    llm = LLM(model=str(default_checkpoint()), kv_cache_tokens=args.seqs * 512, block_size=BLOCK)
    engine = llm.engine
    moes = [layer.mlp for layer in engine.executor.model.layers if isinstance(layer.mlp, MoE)]
    observers = [m.route_observer for m in moes]
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(max_tokens=2 * args.pairs + 16, temperature=0.0, ignore_eos=True)
    for i in range(args.seqs):
        engine.add_request(str(i), torch.randint(3, engine.model_config.vocab_size, (32,), generator=g).tolist(), params)
    for _ in range(4):  # the prefill, then a few decode steps
        engine.step()

    def timed_step(on: bool) -> float:
        for m, obs in zip(moes, observers, strict=True):
            m.route_observer = obs if on else None
        t0 = time.perf_counter()
        engine.step()
        return time.perf_counter() - t0

    times: dict[bool, list[float]] = {True: [], False: []}
    for k in range(args.pairs):
        for on in (True, False) if k % 2 else (False, True):
            times[on].append(timed_step(on))
    llm.shutdown()
    on, off = statistics.median(times[True]), statistics.median(times[False])
    return {"on": on, "off": off, "tok_on": args.seqs / on, "tok_off": args.seqs / off}


def table(u: dict[str, Any] | None, rec: dict[str, float] | None, load: tuple[float, float]) -> str:
    lines = []
    if u is not None:
        base = u["baseline"]
        staging = [t for m in u["migrations"] for t in m.staging_steps]
        commits = [m.commit_step for m in u["migrations"]]
        lines += [
            f"Measured: {u['topology']}; {u['seqs']} sequences decoding through `LLMEngine` (one token each per step); "
            f"{platform.machine()}, {os.cpu_count()} cores shared, load average {load[0]:.1f} at the start and "
            f"{load[1]:.1f} at the end, torch {torch.__version__}.",
            "",
            "| engine steps | n | p50 ms | p90 ms | max ms |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, xs in (("no migration (before)", base), ("while staging", staging), ("commit step", commits),
                         ("after the migrations", u["after"])):
            lines.append(f"| {name} | {len(xs)} | {pct(xs, 50) * 1e3:.0f} | {pct(xs, 90) * 1e3:.0f} | {max(xs) * 1e3:.0f} |"
                         if xs else f"| {name} | 0 | - | - | - |")
        lines += [
            "",
            "| migration | copies moved | MiB moved | from peers / disk | fresh plan would move | staging ms "
            "| steps staging | commit step ms (5 steps before: median) | commit's extra time, decode steps "
            "| in-place copy + maps ms "
            "| busiest / mean before -> after |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for m in u["migrations"]:
            extra = (m.commit_step - m.local_p50) / m.local_p50
            lines.append(
                f"| {m.kind} | {m.moved} | {m.bytes / 2**20:.1f} | {m.from_peers} / {m.from_disk} | {m.fresh_moved} "
                f"| {m.stage_s * 1e3:.0f} | {len(m.staging_steps)} | {m.commit_step * 1e3:.0f} ({m.local_p50 * 1e3:.0f}) "
                f"| {extra:+.2f} "
                f"| {m.commit_s * 1e3:.1f} | {m.before:.2f} -> {m.after:.2f} |"
            )
    if rec is not None:
        lines += [
            "",
            f"Single process (`LLMEngine`, {u['seqs'] if u else 16} sequences decoding, float32, one thread): decode "
            "step time with expert-load recording on and off, switched every step (medians of the steps of each kind):",
            "",
            "| expert-load recording | decode step ms | decode tok/s |",
            "|---|---:|---:|",
            f"| on | {rec['on'] * 1e3:.2f} | {rec['tok_on']:.0f} |",
            f"| off | {rec['off'] * 1e3:.2f} | {rec['tok_off']:.0f} |",
            f"| on / off | {rec['on'] / rec['off']:.3f} | |",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="decode steps timed before and after each migration")
    ap.add_argument("--rounds", type=int, default=2, help="(re-plan, fresh plan) pairs of migrations, then a re-plan")
    ap.add_argument("--pairs", type=int, default=200, help="single-process decode step pairs, recorder on / off")
    ap.add_argument("--skip-unit", action="store_true")
    ap.add_argument("--skip-recorder", action="store_true")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    u = None if args.skip_unit else measure_unit(args)
    rec = None if args.skip_recorder else measure_recorder(args)
    text = table(u, rec, (load0, os.getloadavg()[0]))
    print(text)
    if args.write:
        print(f"bench_migration: wrote {write_block('bench_migration.py', text)}", file=sys.stderr)


if __name__ == "__main__":
    main()
