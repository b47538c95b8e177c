"""The peer benchmark harness's pure parts (benchmarks/peers): result parsing, medians and ratios,
the interleaved schedule, the generated raymoe deployment files. No servers, no vLLM."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.peers.report import BASELINE, Row, RunFigures, render_bench_rows, render_table, schedule
from benchmarks.peers.run import DIRECT_RE, Model, write_raymoe_yamls
from raymoe.serve.config import check_config_file, load_config_file


def result(tok: float, tpot: float, ttft: float, failed: int = 0) -> dict:
    """The fields of a `vllm bench serve --save-result` file, as vllm 0.32 writes them (with others)."""
    return {
        "duration": 11.4, "completed": 128 - failed, "failed": failed, "output_throughput": tok,
        "request_throughput": tok / 64, "median_ttft_ms": ttft, "p99_ttft_ms": ttft * 1.5, "mean_ttft_ms": ttft,
        "median_tpot_ms": tpot, "p99_tpot_ms": tpot * 1.2, "p50_tpot_ms": tpot, "ttfts": [0.2] * 4,
    }


def test_result_file_fields() -> None:
    fig = RunFigures.from_result(result(716.6, 18.4, 244.0, failed=2))
    assert (fig.output_tok_s, fig.tpot_p50_ms, fig.ttft_p50_ms) == (716.6, 18.4, 244.0)
    assert fig.tpot_p99_ms == pytest.approx(18.4 * 1.2) and fig.ttft_p99_ms == pytest.approx(366.0)
    assert (fig.completed, fig.failed) == (126, 2)
    doc = result(1.0, 1.0, 1.0)
    del doc["p99_tpot_ms"]  # run without --metric-percentiles 50,99
    with pytest.raises(KeyError, match="p99_tpot_ms"):
        RunFigures.from_result(doc)


def test_schedule_interleaves_repeats() -> None:
    assert schedule(["a", "b", "c"], 2) == [(0, "a"), (0, "b"), (0, "c"), (1, "a"), (1, "b"), (1, "c")]
    assert schedule(["a"], 0) == []


def test_table_medians_and_ratios_against_vllm() -> None:
    vllm = Row(BASELINE, "its HTTP server", [RunFigures.from_result(result(t, 16.0, 200.0)) for t in (700, 800, 760)])
    ours = Row("raymoe unified", "direct ingress",
               [RunFigures.from_result(result(t, p, 240.0), load) for t, p, load in
                ((380, 30.0, 1.0), (1000, 8.0, 0.5), (400, 32.0, 7.3))])
    table = render_table([ours, vllm, Row("raymoe disaggregated", "Serve proxy")])  # a row never measured: left out
    lines = table.splitlines()
    assert len(lines) == 4
    # medians, not means: 400 tok/s (mean 593), TPOT 30 ms; vLLM 760 tok/s, 16 ms
    assert "| raymoe unified | direct ingress | 400.0 | 0.53x | 30.0 / 36.0 | 1.88x | 240 / 360 | 1.20x |" in lines[2]
    assert "380, 30.0, 240 (1.0); 1000, 8.0, 240 (0.5); 400, 32.0, 240 (7.3)" in lines[2]
    assert lines[3].startswith("| vllm serve | its HTTP server | 760.0 | 1.00x |")


def test_table_without_vllm_has_no_ratios() -> None:
    row = Row("raymoe unified", "direct ingress", [RunFigures.from_result(result(500, 20.0, 100.0, failed=3))])
    line = render_table([row]).splitlines()[2]
    assert "(3 failed requests)" in line and "| 500.0 | - |" in line and "| 20.0 / 24.0 | - |" in line


def test_raymoe_bench_rows() -> None:
    rows = [
        {"mode": "engine", "concurrency": 16, "out_tok_per_s": 1000.0, "ttft_p50_ms": 100.0, "ttft_p99_ms": 120.0,
         "tpot_p50_ms": 9.0, "tpot_p99_ms": 9.5, "errors": 0},
        {"mode": "unified", "concurrency": 16, "out_tok_per_s": 800.0, "ttft_p50_ms": 150.0, "ttft_p99_ms": 200.0,
         "tpot_p50_ms": 11.0, "tpot_p99_ms": 12.0, "errors": 1},
    ]
    lines = render_bench_rows(rows).splitlines()
    assert lines[2] == "| engine | 16 | 1000.0 | 100 / 120 | 9.0 / 9.5 | 1.00x |"
    assert lines[3] == "| unified (1 errors) | 16 | 800.0 | 150 / 200 | 11.0 / 12.0 | 0.80x |"


def test_direct_ingress_url_from_server_logs() -> None:
    # raymoe/serve/runner.py's line and ray_serve_llm.py's
    assert DIRECT_RE.search("raymoe: direct ingress (no proxy hop) at http://127.0.0.1:30001/v1\n").group(1) \
        == "http://127.0.0.1:30001"
    assert DIRECT_RE.search("ray-serve-llm: direct ingress at http://127.0.0.1:30002/api/v1").group(1) \
        == "http://127.0.0.1:30002/api"
    assert DIRECT_RE.search("raymoe: serving m at http://127.0.0.1:8000/v1") is None


def test_generated_raymoe_configs(tmp_path: Path) -> None:
    model = Model("mla576-bf16", tmp_path / "m", "tiny-mla", "bfloat16", str(tmp_path / "m"))
    paths = write_raymoe_yamls(model, tmp_path, 18123, 1024)
    assert set(paths) == {"raymoe-unified", "raymoe-disaggregated"}
    for key, path in paths.items():
        assert check_config_file(path) == []
        cfg = load_config_file(path)
        assert cfg.disaggregated is (key == "raymoe-disaggregated")
        assert (cfg.model.path, cfg.model.name, cfg.model.dtype, cfg.model.max_model_len) == \
            (str(tmp_path / "m"), "tiny-mla", "bfloat16", 1024)
        assert f"port: {18123}" in path.read_text()
    default = write_raymoe_yamls(Model("tiny-f32", tmp_path, "tiny-deepseek-v3", "float32", None), tmp_path, 1, 2048)
    assert load_config_file(default["raymoe-unified"]).model.path is None


def test_raymoe_bench_text_prompts_count_usage() -> None:
    """`raymoe bench --text-prompts`: text in the request, tokens counted from the usage chunk (as
    `vllm bench serve` counts them), first token at the first chunk with a choice."""
    import asyncio
    import json

    import httpx

    from raymoe.serve.bench import _one, text_prompts

    sent: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        events = [{"choices": [{"index": 0, "text": t}]} for t in ("Hel", "", "lo")]
        if sent[-1].get("stream_options"):
            events.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}})
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    async def go(prompt: list[int] | str) -> object:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await _one(client, "http://x", "m", prompt, 7)

    res = asyncio.run(go("Hello there"))
    assert res.output_tokens == 7 and res.tpot is not None
    assert sent[0]["prompt"] == "Hello there" and sent[0]["stream_options"] == {"include_usage": True}
    assert "return_token_ids" not in sent[0]
    with pytest.raises(RuntimeError, match="no tokens streamed"):  # token-id prompts count ids: none here
        asyncio.run(go([1, 2, 3]))
    assert sent[1]["return_token_ids"] is True

    class Tok:
        def decode(self, ids: list[int]) -> str:
            return "-".join(map(str, ids))

    assert text_prompts([[1, 2], [3]], Tok()) == ["1-2", "3"]
