"""raymoe's engine vs transformers' generate: greedy decode throughput and KV-cache bytes per token.

Same checkpoint (the tiny default unless --model), same process, same thread count, interleaved
repeats: for each concurrency, N sequences of --prompt-len random prompt tokens each generate
--output-len tokens (EOS ignored). End-to-end throughput = generated tokens / wall time of the
whole call (prefill included); decode throughput = the tokens after the first / (that time minus
the time of the same call with one output token, i.e. the prefill). KV bytes per token: raymoe's latent cache (kv_lora_rank + rope dims per layer)
vs the bytes transformers' cache holds after generate, divided by the tokens it covers.

    python benchmarks/bench_engine.py            # prints the table
    python benchmarks/bench_engine.py --write    # also writes it into docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raymoe import LLM, SamplingParams
from raymoe.model.config import ModelConfig

SECTION = "## Engine vs transformers"
BEGIN = "<!-- bench_engine.py: begin -->"
END = "<!-- bench_engine.py: end -->"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n, length), generator=g).tolist()


@dataclass(frozen=True)
class Timing:
    """Wall seconds, and this process's CPU seconds (what other jobs on a shared box cannot inflate)."""

    wall: float
    cpu: float


class timer:
    def __enter__(self) -> timer:
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timing = Timing(time.perf_counter() - self.w, time.process_time() - self.c)


def run_raymoe(llm: LLM, prompts: list[list[int]], output_len: int) -> tuple[Timing, list[list[int]]]:
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    with timer() as t:
        outs = llm.generate(prompts, params, use_tqdm=False)
    dt = t.timing
    assert all(len(o.token_ids) == output_len for o in outs)
    return dt, [o.token_ids for o in outs]


def run_transformers(
    hf: Any, prompts: list[list[int]], output_len: int
) -> tuple[Timing, list[list[int]], Any]:
    ids = torch.tensor(prompts)
    with timer() as t, torch.inference_mode():
        out = hf.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=output_len,
            min_new_tokens=output_len,  # transformers' way of ignoring EOS
            do_sample=False,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    dt = t.timing
    tokens = out.sequences[:, ids.shape[1] :].tolist()
    assert all(len(row) == output_len for row in tokens)
    return dt, tokens, out.past_key_values


def cache_bytes(cache: Any) -> int:
    """Bytes of every tensor a transformers cache holds (DynamicCache layers or legacy tuples)."""
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    for layer in cache:
        for t in layer:
            total += t.numel() * t.element_size()
    return total


def speedups(
    ours: list[Timing], theirs: list[Timing], ours_p: list[Timing], theirs_p: list[Timing], kind: str
) -> tuple[float, float]:
    """Medians of the per-repeat (end-to-end, decode-only) speed-ups; each pair was measured back to back."""
    o, h, op, hp = ([getattr(x, kind) for x in xs] for xs in (ours, theirs, ours_p, theirs_p))
    e2e = statistics.median(b / a for a, b in zip(o, h, strict=True))
    dec = statistics.median((b - bp) / max(a - ap, 1e-9) for a, b, ap, bp in zip(o, h, op, hp, strict=True))
    return e2e, dec


def write_section(table: str) -> None:
    """Replace the figures between this script's markers in its own section (prose around them is kept)."""
    text = DOCS.read_text()
    if BEGIN in text and END in text:
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        DOCS.write_text(text[:start] + "\n" + table + "\n" + text[end:])
        return
    start = text.index(SECTION) + len(SECTION)
    nxt = text.find("\n## ", start)
    end = len(text) if nxt < 0 else nxt + 1
    block = f"\n\n{BEGIN}\n{table}\n{END}\n" + ("\n" if nxt >= 0 else "")
    DOCS.write_text(text[:start] + block + text[end:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: the generated tiny model)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads for both (1: stable on shared boxes)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--write", action="store_true", help=f"write the table into {DOCS}")
    args = ap.parse_args(argv)

    import transformers
    from transformers import DeepseekV3ForCausalLM

    transformers.logging.set_verbosity_error()  # the MTP layer's tensors are "unexpected" to it, by design

    from raymoe.model.tiny import default_checkpoint

    torch.set_num_threads(args.threads)
    model = Path(args.model) if args.model else default_checkpoint()
    mc = ModelConfig.from_checkpoint(model)
    print(f"raymoe: engine vs transformers on {model} ({args.device}, {args.threads} thread(s))", flush=True)
    max_len = args.prompt_len + args.output_len
    llm = LLM(model, dtype="float32", device=args.device, max_model_len=max_len + 1, block_size=16)
    hf = DeepseekV3ForCausalLM.from_pretrained(model, dtype=torch.float32).to(args.device).eval()
    hf.generation_config.eos_token_id = None

    # warm both on the measured shapes (allocator, caches, first-call paths)
    warm = make_prompts(1, args.prompt_len, mc.vocab_size, seed=10_000)
    run_raymoe(llm, warm, args.output_len)
    run_transformers(hf, warm, args.output_len)

    rows = []
    hf_kv_per_token = 0.0
    for c in args.concurrency:
        ours_t: list[Timing] = []
        hf_t: list[Timing] = []
        ours_p: list[Timing] = []
        hf_p: list[Timing] = []
        same: list[float] = []
        for r in range(args.repeats):
            prompts = make_prompts(c, args.prompt_len, mc.vocab_size, seed=1000 * c + r)
            dt, ours_tokens = run_raymoe(llm, prompts, args.output_len)
            ours_t.append(dt)
            dt, hf_tokens, cache = run_transformers(hf, prompts, args.output_len)
            hf_t.append(dt)
            hf_kv_per_token = cache_bytes(cache) / (c * (args.prompt_len + args.output_len - 1))
            same.append(sum(a == b for a, b in zip(ours_tokens, hf_tokens, strict=True)) / c)
            # prefill only (one output token), on fresh prompts so raymoe's prefix cache cannot help
            prompts = make_prompts(c, args.prompt_len, mc.vocab_size, seed=1000 * c + r + 500)
            ours_p.append(run_raymoe(llm, prompts, 1)[0])
            hf_p.append(run_transformers(hf, prompts, 1)[0])
            print(
                f"  concurrency {c:3d} repeat {r}: raymoe {c * args.output_len / ours_t[-1].wall:8.1f} tok/s, "
                f"transformers {c * args.output_len / hf_t[-1].wall:8.1f} tok/s (end to end)",
                flush=True,
            )
        med = statistics.median
        wall = (
            [x.wall for x in ours_t],
            [x.wall for x in hf_t],
            [x.wall for x in ours_p],
            [x.wall for x in hf_p],
        )
        ours, theirs = c * args.output_len / med(wall[0]), c * args.output_len / med(wall[1])
        decoded = c * (args.output_len - 1)
        ours_d = decoded / max(med(wall[0]) - med(wall[2]), 1e-9)
        theirs_d = decoded / max(med(wall[1]) - med(wall[3]), 1e-9)

        ratio, ratio_d = speedups(ours_t, hf_t, ours_p, hf_p, "wall")
        cpu_ratio, cpu_ratio_d = speedups(ours_t, hf_t, ours_p, hf_p, "cpu")
        rows.append((c, ours, theirs, ratio, ours_d, theirs_d, ratio_d, cpu_ratio, cpu_ratio_d, med(same)))

    runner = llm.engine.executor
    ours_kv = runner.kv_bytes_per_token  # type: ignore[attr-defined]
    mla = mc.num_hidden_layers * (mc.kv_lora_rank + mc.qk_rope_head_dim) * 4
    mha = mc.num_hidden_layers * mc.num_attention_heads * (mc.qk_head_dim + mc.v_head_dim) * 4
    cmd = (
        "python benchmarks/bench_engine.py"
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    )
    lines = [
        f"Command: `{cmd.replace(' --write', '')}` (medians of {args.repeats} interleaved repeats; "
        f"{args.prompt_len} prompt + {args.output_len} output tokens per sequence, greedy, EOS ignored; "
        f"float32, {args.threads} torch thread(s), {args.device}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}). Model: tiny default checkpoint ({mc.num_hidden_layers} layers, hidden "
        f"{mc.hidden_size}, {mc.n_routed_experts} routed experts top-{mc.num_experts_per_tok}, MLA "
        f"kv_lora_rank {mc.kv_lora_rank} + rope {mc.qk_rope_head_dim}, {mc.num_attention_heads} heads).",
        "",
        "| concurrent sequences | raymoe tok/s | transformers tok/s | speed-up "
        "| raymoe decode tok/s | transformers decode tok/s | decode speed-up "
        "| speed-up, CPU time | decode speed-up, CPU time | same tokens |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, ours, theirs, ratio, ours_d, theirs_d, ratio_d, cpu_ratio, cpu_ratio_d, same_frac in rows:
        lines.append(
            f"| {c} | {ours:.1f} | {theirs:.1f} | {ratio:.2f}x | {ours_d:.1f} | {theirs_d:.1f} | {ratio_d:.2f}x "
            f"| {cpu_ratio:.2f}x | {cpu_ratio_d:.2f}x | {same_frac:.0%} |"
        )
    lines += [
        "",
        "| KV cache bytes per token (all layers, float32) | bytes | ratio |",
        "|---|---:|---:|",
        f"| raymoe latent cache (kv_lora_rank + rope dims) | {ours_kv} | 1 |",
        f"| transformers cache, measured after generate | {hf_kv_per_token:.0f} | {hf_kv_per_token / ours_kv:.1f}x |",
        f"| MLA ratio: heads x (k + v dims) vs kv_lora_rank + rope dims | {mha} vs {mla} | {mha / mla:.1f}x |",
        "",
        "tok/s: medians over repeats; speed-up: median of the per-repeat ratios (each pair run "
        "back to back). 'CPU time' columns: the same ratios from each process's own CPU seconds, "
        "which other jobs on a shared box cannot inflate (one torch thread, so CPU time is compute time). "
        "End to end includes the prefill; decode columns: the decode phase alone "
        "(whole call minus a one-output-token call on same-length prompts). transformers 5.23's "
        "DeepSeek-V3 also caches the compressed latent (c_kv and k_pe), so its cache bytes equal "
        "raymoe's; a per-head K/V cache would take the MLA-ratio more.",
        f"'same tokens': share of sequences whose {args.output_len} greedy tokens are identical in both (float32 "
        "rounding differs between the absorbed and expanded attention, so long random-model "
        "generations can part at near-ties).",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(table)
        print(f"raymoe: wrote {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
