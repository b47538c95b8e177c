"""Where a benchmark's `--write` puts its tables: its own marked block in docs/BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"


def write_block(script: str, text: str) -> Path:
    """Replace what stands between `<!-- {script}: begin -->` and `<!-- {script}: end -->` with `text`."""
    begin, end = f"<!-- {script}: begin -->", f"<!-- {script}: end -->"
    doc = DOCS.read_text()
    if begin not in doc or end not in doc:
        raise SystemExit(f"{DOCS}: no {begin} ... {end} block to replace (add the markers under its section)")
    start, stop = doc.index(begin), doc.index(end) + len(end)
    DOCS.write_text(doc[:start] + f"{begin}\n{text}\n{end}" + doc[stop:])
    return DOCS
