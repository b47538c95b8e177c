"""Model-level decode step: raymoe's forward over the paged latent cache vs transformers' forward.

No engine, no sampling loop overhead on either side: both models read the same checkpoint in
float32, prefill the same prompts, then run greedy decode steps feeding back their own argmax.
Figures are decode tokens/s (median over repeats, measured side by side in one process), the
share of sequences whose greedy tokens (the prefill's and every decode step's) are identical on
both sides, and KV cache bytes per token.

    python benchmarks/bench_model.py [--model PATH] [--batch 1 8 32] [--prompt 128] [--steps 64] [--threads N]
    python benchmarks/bench_model.py --mixed [--threads N]   # decode step over very different context lengths
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from raymoe.model.attention import AttentionMetadata
from raymoe.model.deepseek_v3 import Transformer
from raymoe.model.tiny import default_checkpoint
from raymoe.model.weights import load_checkpoint


def run_raymoe(model: Transformer, prompts: torch.Tensor, steps: int, block_size: int = 16) -> tuple[float, torch.Tensor]:
    """Decode seconds for `steps` steps of the whole batch, and every sequence's greedy tokens [b, steps + 1]."""
    b, p = prompts.shape
    per_seq = -(-(p + steps) // block_size)
    cache = torch.zeros(model.kv_cache_shape(b * per_seq + 1, block_size))
    tables = [list(range(1 + s * per_seq, 1 + (s + 1) * per_seq)) for s in range(b)]
    with torch.inference_mode():
        md = AttentionMetadata.paged([p] * b, [p] * b, tables, block_size)
        hidden = model(prompts.reshape(-1), torch.arange(p).repeat(b), md, cache)
        nxt = model.compute_logits(hidden[torch.arange(b) * p + p - 1]).argmax(-1)
        out = [nxt]
        t0 = time.perf_counter()
        for i in range(steps):
            ctx = p + i + 1
            md = AttentionMetadata.paged([1] * b, [ctx] * b, tables, block_size)
            nxt = model.compute_logits(model(nxt, torch.full((b,), ctx - 1), md, cache)).argmax(-1)
            out.append(nxt)
        return time.perf_counter() - t0, torch.stack(out, dim=1)


def transformers_cache_bytes_per_token(model: torch.nn.Module, prompt_len: int = 16) -> float:
    """Bytes transformers' DynamicCache holds per token, all layers, measured after a prefill."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(torch.full((1, prompt_len), 5), past_key_values=cache, use_cache=True)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return held / prompt_len


def run_transformers(model: torch.nn.Module, prompts: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    """Like `run_raymoe`, with transformers' forward and `DynamicCache`."""
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        logits = model(prompts, past_key_values=cache, use_cache=True).logits[:, -1]
        nxt = logits.argmax(-1)
        out = [nxt]
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = model(nxt[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
            nxt = logits.argmax(-1)
            out.append(nxt)
        return time.perf_counter() - t0, torch.stack(out, dim=1)


def identical_sequences(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of sequences (rows of [b, tokens]) whose greedy tokens are all the same in `a` and `b`."""
    if a.shape != b.shape:
        raise ValueError(f"token shapes differ: {list(a.shape)} vs {list(b.shape)}")
    return float((a == b).all(dim=1).double().mean())


def mixed_lengths(model: Transformer, short: int = 64, long: int = 2048, n: int = 32, block_size: int = 16) -> None:
    """One decode step over n-1 short contexts and one long: grouped by length vs padded to the longest."""
    from raymoe.model.attention import AttentionPlan

    lens = [short] * (n - 1) + [long]
    tables, k = [], 1
    for length in lens:
        blocks = -(-length // block_size)
        tables.append(list(range(k, k + blocks)))
        k += blocks
    cache = torch.randn(model.kv_cache_shape(k, block_size)) * 0.5
    ids = torch.randint(3, model.config.vocab_size, (n,))
    pos = torch.tensor([length - 1 for length in lens])

    def step_ms() -> float:
        times = []
        for _ in range(16):
            md = AttentionMetadata.paged([1] * n, lens, tables, block_size)
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.compute_logits(model(ids, pos, md, cache))
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:]) * 1e3

    saved = AttentionPlan.DECODE_GROUP_RATIO
    try:
        grouped, padded = [], []
        for _ in range(3):
            AttentionPlan.DECODE_GROUP_RATIO = saved
            grouped.append(step_ms())
            AttentionPlan.DECODE_GROUP_RATIO = float("inf")
            padded.append(step_ms())
    finally:
        AttentionPlan.DECODE_GROUP_RATIO = saved
    g, p = statistics.median(grouped), statistics.median(padded)
    print(
        f"decode step, {n - 1} contexts of {short} + 1 of {long}: grouped by length {g:.1f} ms, "
        f"padded to the longest {p:.1f} ms ({p / g:.1f}x)"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--mixed", action="store_true", help="only the mixed-context-length decode step")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mixed:
        mixed_lengths(load_checkpoint(args.model or default_checkpoint(), progress=False))
        return

    from transformers import AutoModelForCausalLM

    path = args.model or default_checkpoint()
    ours = load_checkpoint(path, dtype=torch.float32, progress=False)
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    cfg = ours.config
    print(f"model {path} | torch threads {torch.get_num_threads()} | prompt {args.prompt} | {args.steps} decode steps")
    print("| sequences | raymoe decode tok/s | transformers decode tok/s | speedup | sequences with the same greedy tokens |")
    print("|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for b in args.batch:
        prompts = torch.randint(3, cfg.vocab_size, (b, args.prompt), generator=g)
        ours_t, ref_t = [], []
        for _ in range(args.repeats):
            dt, ours_tokens = run_raymoe(ours, prompts, args.steps)
            ours_t.append(b * args.steps / dt)
            dt, ref_tokens = run_transformers(ref, prompts, args.steps)
            ref_t.append(b * args.steps / dt)
        same = identical_sequences(ours_tokens, ref_tokens)  # every sequence, all steps + 1 tokens
        o, r = statistics.median(ours_t), statistics.median(ref_t)
        print(f"| {b} | {o:.0f} | {r:.0f} | {o / r:.2f}x | {same:.0%} |")
    latent = cfg.num_hidden_layers * cfg.kv_cache_dim * 4
    per_head = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 4
    print(
        f"KV cache bytes/token (float32, all layers): raymoe latent {latent} "
        f"({cfg.num_hidden_layers} x (kv_lora_rank {cfg.kv_lora_rank} + rope {cfg.qk_rope_head_dim})); "
        f"transformers' DynamicCache, measured: {transformers_cache_bytes_per_token(ref):.0f}; "
        f"a per-head K/V cache would hold {per_head} ({per_head / latent:.1f}x, the MLA ratio)"
    )


if __name__ == "__main__":
    main()
