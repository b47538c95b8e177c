"""Structured output cost: grammar compile time, the per-step mask at 16 rows, and the engine's decode rate.

What a constrained request adds: its grammar compiled once at admission (`StructuredOutputManager.compile`,
cached per spec; a repeat is a deep copy), then per step its row of the packed bitmask filled by
llguidance (`bitmask`, all rows in one parallel call), the mask applied in the sampler
(`apply_token_bitmask`) and its matcher advanced by the sampled token (`accept`). Measured on the
tiny checkpoint's tokenizer (936 tokens); the sampler's mask also at DeepSeek-V3's 129,280.

    python benchmarks/bench_structured.py            # prints the tables
    python benchmarks/bench_structured.py --write    # also writes them into docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from docs_block import write_block

from raymoe import LLM, SamplingParams
from raymoe.engine.sampler import apply_token_bitmask
from raymoe.engine.structured import StructuredOutputManager, StructuredOutputsParams
from raymoe.model.config import ModelConfig
from raymoe.model.tiny import default_checkpoint
from raymoe.model.tokenizer import Tokenizer

V3_VOCAB = 129_280
ROWS = 16

SPECS: dict[str, StructuredOutputsParams] = {
    "json_object": StructuredOutputsParams(json_object=True),
    "object, 2 required fields": StructuredOutputsParams(json={
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
        "required": ["name", "age"], "additionalProperties": False}),
    "nested object + enum array": StructuredOutputsParams(json={
        "type": "object", "properties": {"user": {"type": "object", "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 99},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4}},
            "required": ["id", "tags"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False}),
    "12-field flat object": StructuredOutputsParams(json={
        "type": "object", "properties": {f"f{i}": {"type": ["string", "number", "boolean"]} for i in range(12)},
        "required": [f"f{i}" for i in range(12)], "additionalProperties": False}),
    "regex (date)": StructuredOutputsParams(regex=r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"),
    "choice (3 strings)": StructuredOutputsParams(choice=["alpha", "beta", "gamma"]),
}


def _median_us(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def compile_table(manager: StructuredOutputManager) -> list[str]:
    rows = ["| grammar | first compile ms | cached (copy) µs |", "|---|---:|---:|"]
    for name, spec in SPECS.items():
        cold = []
        for _ in range(5):
            manager._compiled.clear()
            t = time.perf_counter()
            manager.compile(spec)
            cold.append(time.perf_counter() - t)
        warm = _median_us(lambda spec=spec: manager.compile(spec), 50)
        rows.append(f"| {name} | {statistics.median(cold) * 1e3:.2f} | {warm:.1f} |")
    return rows


def step_table(manager: StructuredOutputManager, vocab: int) -> list[str]:
    """16 rows each mid-way through the 12-field object (8 tokens in): fill, apply, accept."""
    spec = SPECS["12-field flat object"]
    ids = [f"r{i}" for i in range(ROWS)]
    g = torch.Generator().manual_seed(0)
    for rid in ids:
        manager.add(rid, spec)
        for _ in range(8):  # walk each matcher a little way in with allowed tokens
            mask = manager.bitmask([rid])
            assert mask is not None
            allowed = [t for t in range(vocab) if (int(mask[0, t // 32]) >> (t % 32)) & 1]
            manager.accept(rid, allowed[int(torch.randint(len(allowed), (1,), generator=g))])
    fill = _median_us(lambda: manager.bitmask(ids), 200)
    mask = manager.bitmask(ids)
    assert mask is not None
    logits = torch.randn(ROWS, vocab)
    apply_tiny = _median_us(lambda: apply_token_bitmask(logits, mask), 200)
    big_logits = torch.randn(ROWS, V3_VOCAB)
    big_mask = torch.full((ROWS, -(-V3_VOCAB // 32)), -1, dtype=torch.int32)
    # interleaved with a softmax over the same logits, repeat by repeat: the ratio survives a loaded box
    pairs = [(_median_us(lambda: apply_token_bitmask(big_logits, big_mask), 1),
              _median_us(lambda: big_logits.softmax(dim=-1), 1)) for _ in range(40)]
    apply_v3 = statistics.median(a for a, _ in pairs)
    softmax_v3 = statistics.median(b for _, b in pairs)
    ratio = statistics.median(a / b for a, b in pairs)
    allowed = [next(t for t in range(vocab) if (int(mask[r, t // 32]) >> (t % 32)) & 1) for r in range(ROWS)]

    def accept_all() -> None:
        for rid, tok in zip(ids, allowed, strict=True):
            manager.accept(rid, tok)
            manager._matchers[rid].rollback(1)

    accept = _median_us(accept_all, 200)
    for rid in ids:
        manager.release(rid)
    return [
        f"| per-step work at {ROWS} constrained rows | µs |", "|---|---:|",
        f"| fill the bitmask (llguidance, all rows in one call), vocab {vocab} | {fill:.1f} |",
        f"| apply it in the sampler, vocab {vocab} | {apply_tiny:.1f} |",
        f"| apply it in the sampler, V3 vocab {V3_VOCAB} | {apply_v3:.1f} |",
        f"| for scale: one softmax over the same {ROWS} x {V3_VOCAB} logits (apply / softmax: {ratio:.2f}x) "
        f"| {softmax_v3:.1f} |",
        f"| advance {ROWS} matchers by their sampled token (+ rollback, to repeat) | {accept:.1f} |",
    ]


def decode_table(llm: LLM) -> list[str]:
    """16 sequences x 64 tokens: no grammar vs every row under a regex longer than 64 tokens can write (same lengths)."""
    prompts = [f"Sequence {i}: the quick brown fox" for i in range(ROWS)]
    plain = SamplingParams(max_tokens=64, temperature=1.0, seed=1, ignore_eos=True)
    spec = StructuredOutputsParams(regex="[a-z ]{2000}")
    constrained = SamplingParams(max_tokens=64, temperature=1.0, seed=1, ignore_eos=True, structured_outputs=spec)
    rates: dict[str, list[float]] = {"none": [], "grammar": []}
    for _ in range(3):
        for name, params in (("none", plain), ("grammar", constrained)):
            t = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            dt = time.perf_counter() - t
            assert all(len(o.token_ids) == 64 for o in outs)
            rates[name].append(sum(len(o.token_ids) for o in outs) / dt)
    none, grammar = statistics.median(rates["none"]), statistics.median(rates["grammar"])
    return [
        f"| engine, {ROWS} sequences x 64 tokens | tok/s |", "|---|---:|",
        f"| no structured output | {none:.1f} |",
        f"| every row under a grammar (regex `[a-z ]{{2000}}`) | {grammar:.1f} ({grammar / none:.2f}x) |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="write the tables into docs/BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = default_checkpoint()
    tok = Tokenizer.from_checkpoint(path)
    mc = ModelConfig.from_checkpoint(path)
    manager = StructuredOutputManager(tok, mc.vocab_size, mc.eos_token_ids)
    t = time.perf_counter()
    manager._llg_tokenizer()
    tok_ms = (time.perf_counter() - t) * 1e3
    llm = LLM(model=path, kv_cache_tokens=8192)
    text = "\n".join([
        f"Command: `python benchmarks/bench_structured.py` (llguidance, tiny checkpoint tokenizer of {mc.vocab_size} "
        f"tokens, medians; 1 torch thread, {platform.machine()}, torch {torch.__version__}). The llguidance tokenizer "
        f"is built once per engine at the first structured request: {tok_ms:.1f} ms here.",
        "",
        *compile_table(manager),
        "",
        *step_table(manager, mc.vocab_size),
        "",
        *decode_table(llm),
    ])
    llm.shutdown()
    print(text)
    if args.write:
        print(f"written to {write_block('bench_structured.py', text)}")


if __name__ == "__main__":
    main()
