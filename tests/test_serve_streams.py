"""The replica's multiplexed output stream, in one process: the real engine behind `LLMServer`, no Serve
(the engine on the replica's thread: `engine_process: false`; tests/test_serve_speed.py runs the core process).

One subscriber's stream carries every request's tokens; each request's own call only holds it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from raymoe.engine.sampling_params import SamplingParams
from raymoe.serve.server import OutputBatch

PROMPTS = [[5, 17, 99, 3, 42], [7, 7, 7], [100, 200, 300, 400], [11, 12]]


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return {
        "model": {"dtype": "float32", "max_model_len": 256},
        "disaggregated": False,
        "engine_process": False,
        "stream_interval_ms": 30,
        "decode": {"engine": {"kv_cache_tokens": 1024, "max_num_seqs": 8}, "max_waiting_requests": 2},
    }


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    from raymoe import LLM
    from raymoe.model.tiny import default_checkpoint

    llm = LLM(model=default_checkpoint(), max_model_len=256, kv_cache_tokens=1024)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True), use_tqdm=False)
    return [o.token_ids for o in outs]


async def _collect(server: Any, subscriber: str, rids: list[str]) -> tuple[dict[str, list[int]], int, dict[str, Any]]:
    """Read the subscriber's stream until every request in `rids` ended: tokens, messages, finish."""
    tokens: dict[str, list[int]] = {r: [] for r in rids}
    finish: dict[str, Any] = {}
    messages = 0
    stream = server.stream_outputs(subscriber)
    assert await stream.__anext__() == OutputBatch([])  # attached
    while len(finish) < len(rids):
        batch = await asyncio.wait_for(stream.__anext__(), timeout=60)
        messages += 1
        for d in batch.deltas:
            tokens[d.request_id].extend(d.token_ids)
            if d.finished:
                finish[d.request_id] = d.finish_reason
    await stream.aclose()
    return tokens, messages, finish


def test_one_stream_carries_every_request_and_coalesces(config: dict[str, Any], reference: list[list[int]]) -> None:
    from raymoe.serve.server import LLMServer

    async def main() -> None:
        server = LLMServer(config)
        params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        rids = [f"r{i}" for i in range(len(PROMPTS))]
        reader = asyncio.create_task(_collect(server, "ingress-a", rids))
        await asyncio.sleep(0)
        held = [server.generate(rid, p, params, "ingress-a") for rid, p in zip(rids, PROMPTS, strict=True)]
        assert [await h.__anext__() for h in held] == ["local"] * len(held)  # admitted, on this replica
        tokens, messages, finish = await reader
        assert [tokens[r] for r in rids] == reference  # greedy parity with the engine, demultiplexed
        assert set(finish.values()) == {"length"}
        # 4 requests x 10 tokens went out in fewer messages than tokens (one stream, coalesced)
        assert messages < sum(len(t) for t in reference) / 2
        for h in held:  # each held call ends once its request did
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(h.__anext__(), timeout=10)
        stats = await server.stats()
        assert stats["in_flight"] == 0 and stats["kv_blocks_used"] == 0

    asyncio.run(main())


def test_cancelled_hold_aborts_and_full_queue_is_refused(config: dict[str, Any]) -> None:
    from raymoe.serve.protocol import QueueFullError
    from raymoe.serve.server import LLMServer

    async def main() -> None:
        server = LLMServer(config)
        long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        held = server.generate("long", PROMPTS[0], long, "ingress-b")
        assert await held.__anext__() == "local"
        stream = server.stream_outputs("ingress-b")
        assert await stream.__anext__() == OutputBatch([])
        first = (await asyncio.wait_for(stream.__anext__(), timeout=30)).deltas
        assert first and first[0].request_id == "long" and first[0].token_ids
        # the client went away: closing its held call aborts the request and frees its KV
        task = asyncio.create_task(held.__anext__())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.2)
        stats = await server.stats()
        assert stats["in_flight"] == 0 and stats["kv_blocks_used"] == 0 and stats["running"] == 0

        # max_num_seqs 8 + max_waiting_requests 2: the 11th request in flight is refused
        admitted = [server.generate(f"q{i}", PROMPTS[1], long, "ingress-b") for i in range(10)]
        for h in admitted:
            await h.__anext__()
        with pytest.raises(QueueFullError, match="max_waiting_requests=2"):
            await server.generate("q10", PROMPTS[1], long, "ingress-b").__anext__()
        for h in admitted:
            await h.aclose()
        await stream.aclose()

    asyncio.run(main())


def test_a_new_stream_supersedes_the_old_one(config: dict[str, Any]) -> None:
    from raymoe.serve.protocol import UnitUnavailable
    from raymoe.serve.server import LLMServer

    async def main() -> None:
        server = LLMServer(config)
        old = server.stream_outputs("ingress-c")
        assert await old.__anext__() == OutputBatch([])
        new = server.stream_outputs("ingress-c")
        assert await new.__anext__() == OutputBatch([])
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        held = server.generate("x", PROMPTS[3], params, "ingress-c")
        await held.__anext__()
        got: list[int] = []
        while len(got) < 3:
            for d in (await asyncio.wait_for(new.__anext__(), timeout=30)).deltas:
                got.extend(d.token_ids)
        with pytest.raises(StopAsyncIteration):  # the old reader was superseded: it ends, it never splits
            await asyncio.wait_for(old.__anext__(), timeout=10)
        with pytest.raises(UnitUnavailable, match="is gone"):  # a stream routed to the wrong replica
            await server.stream_outputs("ingress-c", replica="another").__anext__()
        await new.aclose()
        await held.aclose()

    asyncio.run(main())


def test_requests_of_a_vanished_ingress_are_aborted(config: dict[str, Any]) -> None:
    """An ingress whose stream went away and did not come back within subscriber_ttl_s: its requests
    are aborted (KV freed) and what was buffered for it is dropped."""
    from raymoe.serve.server import LLMServer

    async def main() -> None:
        server = LLMServer(config | {"subscriber_ttl_s": 0.3, "metrics_interval_s": 0.1})
        long = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
        stream = server.stream_outputs("ingress-d")
        assert await stream.__anext__() == OutputBatch([])
        held = server.generate("orphan", PROMPTS[2], long, "ingress-d")
        assert await held.__anext__() == "local"
        await asyncio.wait_for(stream.__anext__(), timeout=30)
        await stream.aclose()  # the ingress is gone; its held call stays open (nobody cancels it)
        with pytest.raises(StopAsyncIteration):  # reaped: the request is aborted and its call ends
            await asyncio.wait_for(held.__anext__(), timeout=10)
        await asyncio.sleep(0.2)
        stats = await server.stats()
        assert stats["subscribers"] == 0 and stats["in_flight"] == 0 and stats["kv_blocks_used"] == 0
        assert stats["generation_tokens"] < 500

    asyncio.run(main())
