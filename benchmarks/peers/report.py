"""The peer benchmark's figures: `vllm bench serve` result files into rows, medians, ratios and tables.

Pure (no servers, no vLLM): run.py measures, this turns what it measured into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

BASELINE = "vllm serve"


@dataclass(slots=True)
class RunFigures:
    """One measured run: the fields of a `vllm bench serve --save-result` JSON the tables use."""

    output_tok_s: float
    tpot_p50_ms: float
    ttft_p50_ms: float
    tpot_p99_ms: float
    ttft_p99_ms: float
    completed: int
    failed: int
    load: float | None = None  # the machine's 1-minute load average as the run began (others' jobs show)

    @classmethod
    def from_result(cls, doc: dict[str, Any], load: float | None = None) -> RunFigures:
        """KeyError naming the field when the file is not a serving result with p50 and p99 figures
        (`--percentile-metrics ttft,tpot --metric-percentiles 50,99`)."""
        return cls(
            output_tok_s=float(doc["output_throughput"]),
            tpot_p50_ms=float(doc["median_tpot_ms"]),
            ttft_p50_ms=float(doc["median_ttft_ms"]),
            tpot_p99_ms=float(doc["p99_tpot_ms"]),
            ttft_p99_ms=float(doc["p99_ttft_ms"]),
            completed=int(doc["completed"]),
            failed=int(doc.get("failed") or 0),
            load=load,
        )


@dataclass(slots=True)
class Row:
    """One server reached one way (direct ingress, Serve's proxy, or its own HTTP server), every repeat."""

    server: str
    ingress: str
    runs: list[RunFigures] = field(default_factory=list)

    def median(self, name: str) -> float:
        return statistics.median(getattr(r, name) for r in self.runs)

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self.runs)


def schedule(servers: list[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, server) in the order they run: every server once per repeat, repeats interleaved
    (A B C A B C), so a shared machine's drift hits every server alike."""
    return [(k, s) for k in range(repeats) for s in servers]


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}x" if base else "-"


def render_table(rows: list[Row]) -> str:
    """Medians over repeats, ratios against the `vllm serve` row (when one was measured), and every
    repeat's figures."""
    base = next((r for r in rows if r.server == BASELINE and r.runs), None)
    tok = base.median("output_tok_s") if base else None
    tpot = base.median("tpot_p50_ms") if base else None
    ttft = base.median("ttft_p50_ms") if base else None
    lines = [
        "| server | reached through | out tok/s | vs vLLM | TPOT p50 / p99 (ms) | TPOT vs vLLM | TTFT p50 / p99 (ms) "
        "| TTFT vs vLLM | per repeat: tok/s, TPOT p50, TTFT p50 (load) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if not r.runs:
            continue
        failed = f" ({r.failed} failed requests)" if r.failed else ""
        each = "; ".join(f"{x.output_tok_s:.0f}, {x.tpot_p50_ms:.1f}, {x.ttft_p50_ms:.0f}"
                         + (f" ({x.load:.1f})" if x.load is not None else "") for x in r.runs)
        lines.append(
            f"| {r.server}{failed} | {r.ingress} | {r.median('output_tok_s'):.1f} | {_ratio(r.median('output_tok_s'), tok)} "
            f"| {r.median('tpot_p50_ms'):.1f} / {r.median('tpot_p99_ms'):.1f} | {_ratio(r.median('tpot_p50_ms'), tpot)} "
            f"| {r.median('ttft_p50_ms'):.0f} / {r.median('ttft_p99_ms'):.0f} | {_ratio(r.median('ttft_p50_ms'), ttft)} "
            f"| {each} |"
        )
    return "\n".join(lines)


def render_bench_rows(rows: list[dict[str, Any]]) -> str:
    """`raymoe bench --json` rows (its own load generator) as a table."""
    lines = [
        "| mode | C | out tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | tok/s vs engine |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    engine = {r["concurrency"]: r["out_tok_per_s"] for r in rows if r["mode"] == "engine"}
    for r in rows:
        b = engine.get(r["concurrency"])
        err = f" ({r['errors']} errors)" if r["errors"] else ""
        lines.append(
            f"| {r['mode']}{err} | {r['concurrency']} | {r['out_tok_per_s']:.1f} | {r['ttft_p50_ms']:.0f} / "
            f"{r['ttft_p99_ms']:.0f} | {r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f} | {_ratio(r['out_tok_per_s'], b)} |"
        )
    return "\n".join(lines)
