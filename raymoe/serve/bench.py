"""`raymoe bench`: an open-loop load generator against the OpenAI endpoint, beside the engine alone.

The same requests (random token-id prompts of a fixed length, `max_tokens` generated with EOS
ignored, so every run does identical work) arrive on a Poisson schedule (`--rate`, default: all
at once) with at most C in flight, for each concurrency C. `--text-prompts` sends them as text,
tokenized by the server, and reads the streamed text, so tokenization and detokenization are
measured too. Each mode reports requests/s, output tokens/s, and TTFT / TPOT percentiles:

- `engine`: the single-process `LLMEngine` stepped in this process (no HTTP, no Ray);
- `disaggregated`: the app over HTTP (ingress -> prefill -> KV handoff -> decode);
- `unified`: the app over HTTP with one unit doing both (no KV handoff).

The overhead column is what HTTP + Serve (+ handoff) cost in output tokens/s against the engine
measured in the same run. `--url` benchmarks an app that is already running instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RequestResult:
    ttft: float
    tpot: float | None
    e2e: float
    output_tokens: int


@dataclass
class RunResult:
    mode: str
    concurrency: int
    num_requests: int
    wall_s: float
    results: list[RequestResult] = field(default_factory=list)
    errors: int = 0

    def summary(self) -> dict[str, Any]:
        ttft = [r.ttft for r in self.results]
        tpot = [r.tpot for r in self.results if r.tpot is not None]
        out = sum(r.output_tokens for r in self.results)

        def pct(xs: list[float], q: float) -> float:
            return float(np.percentile(xs, q) * 1000) if xs else float("nan")

        return {
            "mode": self.mode,
            "concurrency": self.concurrency,
            "requests": len(self.results),
            "errors": self.errors,
            "req_per_s": len(self.results) / self.wall_s,
            "out_tok_per_s": out / self.wall_s,
            "ttft_p50_ms": pct(ttft, 50),
            "ttft_p99_ms": pct(ttft, 99),
            "tpot_p50_ms": pct(tpot, 50),
            "tpot_p99_ms": pct(tpot, 99),
        }


def make_workload(n: int, prompt_len: int, vocab: int, seed: int, rate: float) -> tuple[list[list[int]], list[float]]:
    """Prompts (token ids, specials avoided) and Poisson arrival offsets in seconds."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, size=prompt_len).tolist() for _ in range(n)]
    if rate == float("inf"):
        arrivals = [0.0] * n
    else:
        arrivals = np.cumsum(rng.exponential(1.0 / rate, size=n)).tolist()
        arrivals = [a - arrivals[0] for a in arrivals]
    return prompts, arrivals


# --- the engine alone -------------------------------------------------------------------------
def run_engine(engine: Any, prompts: list[list[int]] | list[str], arrivals: list[float], max_tokens: int, concurrency: int, tag: str) -> RunResult:
    from raymoe.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    n = len(prompts)
    run = RunResult("engine", concurrency, n, 0.0)
    start: dict[str, float] = {}
    first: dict[str, float] = {}
    count: dict[str, int] = {}
    next_i = 0
    in_flight = 0
    t0 = time.perf_counter()
    while len(run.results) < n:
        now = time.perf_counter() - t0
        while next_i < n and in_flight < concurrency and arrivals[next_i] <= now:
            rid = f"{tag}-{next_i}"
            engine.add_request(rid, prompts[next_i], params)
            start[rid] = time.perf_counter()
            count[rid] = 0
            next_i += 1
            in_flight += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, min(arrivals[next_i] - now, 0.01)) if next_i < n else 0.0)
            continue
        outs = engine.step()
        t = time.perf_counter()
        for o in outs:
            if o.new_token_ids and o.request_id not in first:
                first[o.request_id] = t
            count[o.request_id] += len(o.new_token_ids)
            if o.finished:
                in_flight -= 1
                k = count[o.request_id]
                ttft = first[o.request_id] - start[o.request_id]
                tpot = (t - first[o.request_id]) / (k - 1) if k > 1 else None
                run.results.append(RequestResult(ttft, tpot, t - start[o.request_id], k))
    run.wall_s = time.perf_counter() - t0
    return run


# --- the HTTP endpoint ------------------------------------------------------------------------
def text_prompts(prompts: list[list[int]], tokenizer: Any) -> list[str]:
    """The prompts as text (as `vllm bench serve`'s random dataset sends them): the server tokenizes,
    so a prompt's length there may differ from its id count by a few tokens."""
    return [tokenizer.decode(p) for p in prompts]


async def _one(client: Any, url: str, model: str, prompt: list[int] | str, max_tokens: int) -> RequestResult:
    """One streamed completion. Token-id prompts count the streamed ids; a text prompt is timed the
    way `vllm bench serve` times it: first token at the first chunk with a choice, the count from
    the usage chunk."""
    text = isinstance(prompt, str)
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    body.update({"stream_options": {"include_usage": True}} if text else {"return_token_ids": True})
    t0 = time.perf_counter()
    t_first: float | None = None
    n = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if text:
                if chunk["choices"] and t_first is None:
                    t_first = time.perf_counter()
                if chunk.get("usage"):
                    n = chunk["usage"]["completion_tokens"]
                continue
            k = len(chunk["choices"][0].get("token_ids") or [])
            if k and t_first is None:
                t_first = time.perf_counter()
            n += k
    t = time.perf_counter()
    if t_first is None:
        raise RuntimeError("no tokens streamed")
    return RequestResult(t_first - t0, (t - t_first) / (n - 1) if n > 1 else None, t - t0, n)


async def _run_http_async(
    url: str, model: str, prompts: list[list[int]] | list[str], arrivals: list[float], max_tokens: int, concurrency: int, mode: str
) -> RunResult:
    import httpx

    run = RunResult(mode, concurrency, len(prompts), 0.0)
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()

        async def task(i: int) -> None:
            await asyncio.sleep(max(0.0, arrivals[i] - (time.perf_counter() - t0)))
            async with sem:
                try:
                    run.results.append(await _one(client, url, model, prompts[i], max_tokens))
                except Exception as exc:
                    run.errors += 1
                    print(f"raymoe bench: request {i} failed: {exc}", file=sys.stderr)

        await asyncio.gather(*(task(i) for i in range(len(prompts))))
        run.wall_s = time.perf_counter() - t0
    return run


def run_http(url: str, model: str, prompts: list[list[int]] | list[str], arrivals: list[float], max_tokens: int, concurrency: int, mode: str) -> RunResult:
    return asyncio.run(_run_http_async(url, model, prompts, arrivals, max_tokens, concurrency, mode))


# --- orchestration ----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _table(rows: list[dict[str, Any]]) -> str:
    head = "| mode | C | req/s | out tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | tok/s vs engine |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    base = {r["concurrency"]: r["out_tok_per_s"] for r in rows if r["mode"] == "engine"}
    for r in rows:
        b = base.get(r["concurrency"])
        rel = f"{r['out_tok_per_s'] / b:.2f}x" if b else "-"
        err = f" ({r['errors']} errors)" if r["errors"] else ""
        lines.append(
            f"| {r['mode']}{err} | {r['concurrency']} | {r['req_per_s']:.2f} | {r['out_tok_per_s']:.1f} | "
            f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f} | {rel} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raymoe bench", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="deployments/local.yaml", help="deployment YAML of the app to start")
    p.add_argument("--url", help="benchmark a running app at this base URL instead of starting one")
    p.add_argument("--model", help="model id (default: the config's)")
    p.add_argument("--modes", default="engine,disaggregated,unified", help="comma list: engine, disaggregated, unified")
    p.add_argument("--concurrency", default="1,4,16", help="comma list of max in-flight requests")
    p.add_argument("--num-prompts", type=int, default=0, help="requests per concurrency (default: max(8, 3 x C))")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rate", type=float, default=float("inf"), help="Poisson arrival rate, requests/s (inf: all at once)")
    p.add_argument("--repeats", type=int, default=1, help="repeat each measurement, report the median-throughput run")
    p.add_argument("--stream-interval-ms", type=float, default=None, help="override the config's stream_interval_ms")
    p.add_argument("--torch-threads", type=int, default=1, help="intra-op threads of every engine (same for all modes)")
    p.add_argument(
        "--niceness",
        type=int,
        default=15,
        help="run this process (client and engine alone) at Ray's worker niceness, so every mode competes "
        "for a shared machine's CPU alike (Ray starts workers at RAY_worker_niceness=15)",
    )
    p.add_argument(
        "--no-direct-ingress",
        action="store_true",
        help="send requests through Serve's HTTP proxy instead of straight to the ingress replica",
    )
    p.add_argument(
        "--text-prompts",
        action="store_true",
        help="send the prompts as text and read the streamed text (tokens counted from the usage chunk), "
        "as `vllm bench serve` does; the engine alone gets the same text",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write all results to this file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    from raymoe.serve.config import load_config_file

    cfg = load_config_file(args.config)
    if args.niceness:
        import os

        os.nice(max(0, args.niceness - os.nice(0)))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = set(modes) - {"engine", "disaggregated", "unified"}
    if bad:
        raise ValueError(f"--modes: unknown {sorted(bad)} (engine, disaggregated, unified)")
    levels = [int(c) for c in args.concurrency.split(",")]
    model_path = cfg.model.resolved_path()
    model = args.model or cfg.model.served_name()

    import torch

    from raymoe.model.config import ModelConfig

    vocab = ModelConfig.from_checkpoint(model_path).vocab_size
    # fresh prompts for every (concurrency, repeat), the same for every mode: a repeat never finds its
    # prompts in a prefix cache filled by the one before (the engine alone and the app alike)
    workloads: dict[tuple[int, int], tuple[list[list[int]] | list[str], list[float]]] = {
        (c, k): make_workload(
            args.num_prompts or max(8, 3 * c), args.prompt_len, vocab, args.seed + 1000 * k + c, args.rate
        )
        for c in levels
        for k in range(args.repeats)
    }
    warm: list[list[int]] | list[str] = make_workload(2, args.prompt_len, vocab, args.seed + 10**6, float("inf"))[0]
    if args.text_prompts:
        from raymoe.model.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_checkpoint(model_path)
        if tokenizer is None:
            raise ValueError(f"--text-prompts: {model_path} has no tokenizer")
        workloads = {key: (text_prompts(p, tokenizer), a) for key, (p, a) in workloads.items()}
        warm = text_prompts(warm, tokenizer)
    print(
        f"raymoe bench: {model}, {'text ' if args.text_prompts else ''}prompts of {args.prompt_len} tokens, "
        f"{args.max_tokens} generated, "
        f"concurrency {levels}, modes {modes}",
        flush=True,
    )
    runners: dict[str, Any] = {}  # mode -> fn(prompts, arrivals, concurrency) -> RunResult
    cleanup: list[Any] = []
    try:
        if "engine" in modes:
            from raymoe.engine.llm_engine import LLMEngine
            from raymoe.executors import build_executor

            torch.set_num_threads(args.torch_threads)
            ec = cfg.engine_config(cfg.decode)  # what the decode replica runs
            engine = LLMEngine(ec, build_executor(ec, cfg.decode.parallel_config()))
            cleanup.append(engine.shutdown)
            counter = iter(range(10**9))
            runners["engine"] = lambda p, a, c: run_engine(engine, p, a, args.max_tokens, c, f"r{next(counter)}")
        http_modes = [m for m in modes if m != "engine"]
        if http_modes and args.url:
            runners["http"] = lambda p, a, c: run_http(args.url, model, p, a, args.max_tokens, c, "http")
        elif http_modes:
            import ray
            from ray import serve

            from raymoe.serve.app import build_app
            from raymoe.serve.runner import direct_ingress_urls, enable_direct_ingress

            if not args.no_direct_ingress:
                enable_direct_ingress()
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
            cleanup.append(ray.shutdown)
            port = _free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            cleanup.append(serve.shutdown)
            for mode in http_modes:  # all apps up at once, so their runs interleave with the engine's
                conf = json.loads(cfg.model_dump_json())
                conf["disaggregated"] = mode == "disaggregated"
                if args.stream_interval_ms is not None:
                    conf["stream_interval_ms"] = args.stream_interval_ms
                for unit in ("prefill", "decode"):
                    conf[unit]["torch_threads"] = args.torch_threads
                    # the bench measures serving overhead, not admission control
                    conf[unit]["max_waiting_requests"] = max(conf[unit]["max_waiting_requests"], max(levels) * 4)
                print(f"raymoe bench: starting the {mode} app", flush=True)
                name = f"raymoe-bench-{mode}"
                serve.run(build_app(conf), name=name, route_prefix=f"/{mode}")
                direct = [] if args.no_direct_ingress else direct_ingress_urls(name, "127.0.0.1")
                url = direct[0] if direct else f"http://127.0.0.1:{port}/{mode}"
                print(f"raymoe bench: {mode} app at {url} ({'direct ingress' if direct else 'Serve proxy'})", flush=True)
                runners[mode] = lambda p, a, c, u=url, m=mode: run_http(u, model, p, a, args.max_tokens, c, m)
        for fn in runners.values():
            fn(warm, [0.0, 0.0], 2)

        rows: list[dict[str, Any]] = []
        for c in levels:
            runs: dict[str, list[RunResult]] = {m: [] for m in runners}
            for k in range(args.repeats):  # round-robin: drift on a shared machine hits every mode alike
                prompts, arrivals = workloads[c, k]
                for mode, fn in runners.items():
                    runs[mode].append(fn(prompts, arrivals, c))
            for mode, rs in runs.items():
                rs.sort(key=lambda r: r.summary()["out_tok_per_s"])
                sm = rs[len(rs) // 2].summary()
                rows.append(sm)
                print(
                    f"raymoe bench: {mode:13s} C={c:<3d} {sm['out_tok_per_s']:8.1f} tok/s  "
                    f"TTFT p50 {sm['ttft_p50_ms']:.0f} ms  TPOT p50 {sm['tpot_p50_ms']:.1f} ms",
                    flush=True,
                )
    finally:
        for fn in reversed(cleanup):
            fn()

    rows.sort(key=lambda r: (r["concurrency"], ["engine", "unified", "disaggregated", "http"].index(r["mode"])))
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args) | {"rate": str(args.rate)}, "rows": rows}, f, indent=2)
    if any(r["errors"] for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
