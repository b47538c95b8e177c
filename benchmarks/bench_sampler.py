"""Greedy sampling cost: the sampler as at commit 9a6b4c2 (before penalties, logit_bias, logprobs and the
other logits processing landed) against today's, when no request uses any of it.

Both samplers run in this process on identical inputs, interleaved repeat by repeat, medians:
`Sampler()(logits, md)` on greedy rows (1, 16, 64 rows; the tiny model's vocabulary and
DeepSeek-V3's 129,280), then the engine's whole decode step at 16 sequences with either sampler in
its runner (the rest of the step, host side included, is today's in both arms). The old sampler is
read from git (`git show 9a6b4c2:raymoe/engine/sampler.py`) and loaded as a module.

    python benchmarks/bench_sampler.py            # prints the table
    python benchmarks/bench_sampler.py --write    # also writes it into docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from docs_block import write_block

from raymoe import LLM, SamplingParams
from raymoe.engine.executor import SamplingMetadata
from raymoe.engine.sampler import Sampler
from raymoe.model.config import ModelConfig
from raymoe.model.tiny import default_checkpoint

OLD_COMMIT = "9a6b4c2"
V3_VOCAB = 129_280


def old_sampler() -> Callable[..., object]:
    """The Sampler class of `OLD_COMMIT`, loaded from its source (its imports resolve against today's package)."""
    root = Path(__file__).resolve().parent.parent
    src = subprocess.run(
        ["git", "show", f"{OLD_COMMIT}:raymoe/engine/sampler.py"], cwd=root, check=True, capture_output=True, text=True
    ).stdout
    mod = types.ModuleType("sampler_9a6b4c2")
    exec(compile(src, f"{OLD_COMMIT}:raymoe/engine/sampler.py", "exec"), mod.__dict__)
    return mod.Sampler


def greedy_md(n: int) -> SamplingMetadata:
    return SamplingMetadata(
        temperatures=torch.zeros(n), top_ps=torch.ones(n), top_ks=torch.full((n,), -1, dtype=torch.long),
        seeds=[None] * n, output_indices=[0] * n, all_greedy=True, needs_logprobs=False, any_top_p=False,
        any_top_k=False,
    )


def time_calls(fn: Callable[[], object], calls: int) -> float:
    """CPU microseconds per call (this process's: other jobs on a shared box cannot inflate them)."""
    t0 = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - t0) / calls * 1e6


def bench_calls(rows: int, vocab: int, repeats: int, old: object, new: Sampler) -> tuple[float, float, float]:
    """(old µs, new µs, median of per-repeat new/old) for one greedy call on [rows, vocab] logits."""
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows))
    md = greedy_md(rows)
    calls = max(20, int(2e7 / (rows * vocab)))
    assert old(logits, md).token_ids == new(logits, md).token_ids  # type: ignore[operator]
    olds, news = [], []
    for _ in range(repeats):
        olds.append(time_calls(lambda: old(logits, md), calls))  # type: ignore[operator]
        news.append(time_calls(lambda: new(logits, md), calls))
    return statistics.median(olds), statistics.median(news), statistics.median(n / o for n, o in zip(news, olds, strict=True))


def bench_engine(seqs: int, output_len: int, repeats: int, old: object) -> tuple[float, float, float, bool]:
    """Decode tok/s (per CPU second) of the engine at `seqs` greedy sequences with the old and today's sampler
    (interleaved), the median of the per-repeat new/old ratios, and whether both generated the same tokens."""
    llm = LLM(model=default_checkpoint(), kv_cache_tokens=seqs * (32 + output_len) + 256)
    runner = llm.engine.executor
    new = runner.sampler
    vocab = llm.engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, vocab, (seqs, 32), generator=g).tolist()
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def decode_tok_s(sampler: object) -> tuple[float, list[list[int]]]:
        runner.sampler = sampler
        t0 = time.process_time()
        llm.generate(prompts, one, use_tqdm=False)  # the prefill alone, subtracted below
        t1 = time.process_time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        t2 = time.process_time()
        return seqs * (output_len - 1) / ((t2 - t1) - (t1 - t0)), [o.token_ids for o in outs]

    try:
        decode_tok_s(new)  # warm-up
        olds, news, ratios, same = [], [], [], True
        for _ in range(repeats):
            o, old_ids = decode_tok_s(old)
            n, new_ids = decode_tok_s(new)
            olds.append(o)
            news.append(n)
            ratios.append(n / o)
            same = same and old_ids == new_ids
    finally:
        runner.sampler = new
        llm.shutdown()
    return statistics.median(olds), statistics.median(news), statistics.median(ratios), same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--write", action="store_true", help="write the table into docs/BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    old = old_sampler()()
    new = Sampler()
    vocab = ModelConfig.from_checkpoint(default_checkpoint()).vocab_size
    lines = [
        f"Command: `python benchmarks/bench_sampler.py` (medians of {args.repeats} interleaved repeats; greedy rows, "
        f"no logits processing, no logprobs; float32, 1 torch thread, cpu, {platform.machine()}, torch "
        f"{torch.__version__}; CPU time of this process). Old: the sampler at {OLD_COMMIT}; new: today's.",
        "",
        "| greedy call | old µs/call | new µs/call | new / old time (below 1.00x: faster) |",
        "|---|---:|---:|---:|",
    ]
    for v, name in ((vocab, f"tiny vocab {vocab}"), (V3_VOCAB, f"V3 vocab {V3_VOCAB}")):
        for rows in (1, 16, 64):
            o, n, r = bench_calls(rows, v, args.repeats, old, new)
            lines.append(f"| {rows} rows, {name} | {o:.1f} | {n:.1f} | {r:.2f}x |")
            print(lines[-1], flush=True)
    o, n, r, same = bench_engine(16, args.output_len, args.repeats, old)
    lines += [
        "",
        "| engine decode, 16 greedy sequences (32 prompt + "
        f"{args.output_len} output tokens) | old sampler tok/s | new sampler tok/s | new / old tok/s (above 1.00x: "
        "faster) | same tokens |",
        "|---|---:|---:|---:|---:|",
        f"| tiny default checkpoint | {o:.1f} | {n:.1f} | {r:.2f}x | {'yes' if same else 'NO'} |",
        "",
        "new / old: median of the per-repeat ratios (each pair run back to back). Decode tok/s: the tokens "
        "after the first over the CPU seconds of the whole call minus those of a one-output-token call.",
    ]
    print("\n".join(lines))
    if args.write:
        print(f"wrote {write_block('bench_sampler.py', chr(10).join(lines))}")


if __name__ == "__main__":
    main()
