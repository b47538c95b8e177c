"""The serving path's engine-core process (`raymoe.serve.engine_core`): what crosses the replica ->
core boundary, and replicas driving a real core process in-process (no Serve), unified and
disaggregated, including the core dying under a request."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from raymoe.engine.executor import PromptLogprobs, TopLogprobs
from raymoe.engine.outputs import EngineStats, KVHandoff, RequestOutput
from raymoe.engine.sampling_params import SamplingParams
from raymoe.serve.server import OutputBatch

PROMPTS = [[5, 17, 99, 3, 42], [7, 7, 7], [100, 200, 300, 400]]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _stats() -> EngineStats:
    return EngineStats(1, 2, 0, 64, 3, 61, 16, 10, 4, 0, 0, [2], [3])


def test_a_step_batch_crosses_the_boundary_whole() -> None:
    """Every field of a step's outputs survives msgspec (a field the wire cannot carry fails here)."""
    import msgspec

    from raymoe.serve.engine_core import FromCore, Reply, StepBatch

    outs = [
        RequestOutput("a", [3, 4], [-0.5, -1.25], False, None, 5, None, None,
                      [TopLogprobs([3, 9], [-0.5, -2.0]), None],
                      PromptLogprobs([-1.0, -2.0], [1, 7], [TopLogprobs([1], [-0.1]), TopLogprobs([2], [-0.2])])),
        RequestOutput("b", [], None, True, "error", 3, "text", "sampling failed"),
    ]
    batch = StepBatch(outs, [], _stats(), True, 7, 0.25, 12)
    got = msgspec.msgpack.Decoder(FromCore).decode(msgspec.msgpack.Encoder().encode(batch))
    assert got == batch and isinstance(got.outputs[0], RequestOutput)
    reply = Reply(3, error="prompt is empty", error_type="ValueError")
    assert msgspec.msgpack.Decoder(FromCore).decode(msgspec.msgpack.Encoder().encode(reply)) == reply


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_handoff_frames_round_trip(dtype: str) -> None:
    from raymoe.serve.engine_core import kv_from_frame, kv_to_frame

    kv = torch.randn(4, 37, 80).to(getattr(torch, dtype))
    sent = KVHandoff("r1", list(range(37)), 5, -0.25, kv, TopLogprobs([5, 6], [-0.25, -3.0]))
    meta, raw = kv_to_frame(sent)
    got = kv_from_frame(meta, bytes(raw))
    assert got.kv.dtype == kv.dtype and torch.equal(got.kv, kv)
    assert (got.request_id, got.prompt_token_ids, got.first_token_id, got.first_logprob, got.first_top_logprobs) == (
        "r1", list(range(37)), 5, -0.25, TopLogprobs([5, 6], [-0.25, -3.0]))


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    from raymoe import LLM
    from raymoe.model.tiny import default_checkpoint

    llm = LLM(model=default_checkpoint(), max_model_len=256, kv_cache_tokens=1024)
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def _config(disaggregated: bool, **extra: Any) -> dict[str, Any]:
    unit = {"engine": {"kv_cache_tokens": 1024, "max_num_seqs": 8}, "torch_threads": 1}
    return {"model": {"dtype": "float32", "max_model_len": 256}, "disaggregated": disaggregated,
            "engine_process": True, "stream_interval_ms": 0, "prefill": unit, "decode": unit, **extra}


async def _read(stream: Any, rids: list[str]) -> dict[str, Any]:
    """Tokens and the final delta of each request, from a subscriber's stream."""
    tokens: dict[str, list[int]] = {r: [] for r in rids}
    ends: dict[str, Any] = {}
    while len(ends) < len(rids):
        for d in (await asyncio.wait_for(stream.__anext__(), timeout=60)).deltas:
            tokens[d.request_id].extend(d.token_ids)
            if d.finished:
                ends[d.request_id] = d
    return {"tokens": tokens, "ends": ends}


def test_unified_replica_over_an_engine_core_process(ray_cluster: Any, reference: list[list[int]]) -> None:
    """Greedy parity with the engine alone, a refused prompt, an abort that frees the KV, stats from the
    core; then the core process dies: the request in flight ends `unavailable`, new ones are refused and
    the health check fails (Serve restarts the replica)."""
    import ray

    from raymoe.serve.protocol import RequestRejected, UnitUnavailable
    from raymoe.serve.server import LLMServer

    async def main() -> None:
        server = LLMServer(_config(False))
        stream = server.stream_outputs("ing")
        assert await stream.__anext__() == OutputBatch([])
        rids = [f"r{i}" for i in range(len(PROMPTS))]
        held = [server.generate(r, p, GREEDY, "ing") for r, p in zip(rids, PROMPTS, strict=True)]
        assert [await h.__anext__() for h in held] == ["local"] * len(held)
        got = await _read(stream, rids)
        assert [got["tokens"][r] for r in rids] == reference
        assert {d.finish_reason for d in got["ends"].values()} == {"length"}
        with pytest.raises(RequestRejected, match="prompt is empty"):
            await server.generate("empty", [], GREEDY, "ing").__anext__()

        long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        cut = server.generate("cut", PROMPTS[0], long, "ing")
        await cut.__anext__()
        first = (await asyncio.wait_for(stream.__anext__(), timeout=60)).deltas
        assert first[0].request_id == "cut"
        await cut.aclose()  # the client went away: aborted in the core, its blocks freed
        for _ in range(100):
            stats = await server.stats()
            if stats["kv_blocks_used"] == 0:
                break
            await asyncio.sleep(0.05)
        assert stats["kv_blocks_used"] == 0 and stats["in_flight"] == 0
        assert stats["steps"] > 0 and stats["mean_running_per_step"] >= 1
        assert stats["generation_tokens"] < 24 + 200

        doomed = server.generate("doomed", PROMPTS[1], long, "ing")
        await doomed.__anext__()
        await asyncio.wait_for(stream.__anext__(), timeout=60)
        ray.kill(server.core.actor)  # type: ignore[attr-defined]
        end = None
        while end is None:
            for d in (await asyncio.wait_for(stream.__anext__(), timeout=60)).deltas:
                if d.request_id == "doomed" and d.finished:
                    end = d
        assert end.error_kind == "unavailable"
        with pytest.raises(RuntimeError, match="deployment unit failed"):
            await server.check_health()
        with pytest.raises(UnitUnavailable):
            await server.generate("late", PROMPTS[2], GREEDY, "ing").__anext__()
        await stream.aclose()
        server.core.shutdown()

    asyncio.run(main())


@pytest.mark.parametrize("transport", ["object_store", "direct"])
def test_disaggregated_replicas_over_engine_core_processes(
    ray_cluster: Any, reference: list[list[int]], transport: str
) -> None:
    """The KV crosses the boundaries as raw frames: prefill core -> prefill replica -> object store ->
    decode replica -> decode core, or (direct) prefill core -> decode replica -> decode core, which
    frees it in the prefill core as it is fetched; the decode is token-identical to the engine alone."""
    from raymoe.serve.server import DecodeServer, PrefillServer

    async def main() -> None:
        config = _config(True, kv_transport=transport)
        prefill, decode = PrefillServer(config), DecodeServer(config)
        stream = decode.stream_outputs("ing")
        assert await stream.__anext__() == OutputBatch([])
        rids = [f"d{i}" for i in range(len(PROMPTS))]
        firsts, held = {}, []
        for rid, prompt in zip(rids, PROMPTS, strict=True):
            res = await prefill.prefill(rid, prompt, GREEDY)
            assert not res.finished and res.ticket is not None and res.prompt_len == len(prompt)
            firsts[rid] = res.first_token_id
            h = decode.decode(rid, res.ticket, GREEDY, "ing")
            assert await h.__anext__() == "local"  # admitted; the KV is fetched and added as the call goes on
            held.append(asyncio.ensure_future(h.__anext__()))
        got = await _read(stream, rids)
        for h in held:  # each held call ends once its request did
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(h, timeout=10)
        assert [[firsts[r], *got["tokens"][r]] for r in rids] == reference
        stats = await prefill.stats()
        assert stats["kv_blocks_used"] == 0  # exported and freed in the prefill core
        if transport == "direct":
            assert stats["pinned_kv_handoffs"] == 0  # each fetch was its release: no call needed
        else:
            assert stats["pinned_kv_handoffs"] == len(rids)
            assert all([await prefill.release(r) for r in rids])
        await stream.aclose()
        prefill.core.shutdown()
        decode.core.shutdown()

    asyncio.run(main())


def test_direct_kv_is_fetched_once_dropped_on_release_and_expires(ray_cluster: Any) -> None:
    """A prefill core's KV socket: a handoff goes to the first fetch only (over IPC, and over TCP as a
    decode replica on another node would fetch it), a release drops it, one nobody fetches expires
    after kv_ticket_ttl_s; every miss is an error naming the request, never a hang."""
    from raymoe import LLM
    from raymoe.model.tiny import default_checkpoint
    from raymoe.serve.kv_transport import DirectTransport
    from raymoe.serve.server import PrefillServer

    prompt = PROMPTS[0]
    engine = LLM(model=default_checkpoint(), max_model_len=256, kv_cache_tokens=1024).engine
    engine.add_request("ref", prompt, GREEDY, prefill_only=True)
    while engine.has_unfinished_requests():
        engine.step()
    want = engine.export_kv("ref")

    async def main() -> None:
        prefill = PrefillServer(_config(True, kv_transport="direct", kv_ticket_ttl_s=3.0))
        ipc, tcp = DirectTransport(fetch_timeout_s=5), DirectTransport(fetch_timeout_s=5)
        tcp._node = "another-node"  # as seen from elsewhere: the core's TCP address
        tickets = {rid: (await prefill.prefill(rid, prompt, GREEDY)).ticket for rid in ("a", "b", "c", "d")}
        assert {t.transport for t in tickets.values()} == {"direct"}
        assert tickets["a"].ref.ipc.startswith("ipc://") and tickets["a"].ref.tcp.startswith("tcp://")
        assert (await prefill.stats())["pinned_kv_handoffs"] == 4
        for transport, rid in ((ipc, "a"), (tcp, "b")):
            got = await transport.receive(tickets[rid])
            assert torch.equal(got.kv, want.kv) and got.first_token_id == want.first_token_id
            assert got.prompt_token_ids == prompt
            with pytest.raises(RuntimeError, match=f"holds no KV for request '{rid}'"):
                await transport.receive(tickets[rid])
        assert await prefill.release("c")  # a DropKV to the core's loop, beside the KV socket: wait until it landed
        for _ in range(100):
            if (await prefill.stats())["pinned_kv_handoffs"] == 1:  # "d" alone
                break
            await asyncio.sleep(0.01)
        with pytest.raises(RuntimeError, match="holds no KV for request 'c'"):
            await ipc.receive(tickets["c"])
        await asyncio.sleep(3.6)  # past the TTL and one expiry pass of the KV server thread
        assert (await prefill.stats())["pinned_kv_handoffs"] == 0
        with pytest.raises(RuntimeError, match="holds no KV for request 'd'"):
            await ipc.receive(tickets["d"])
        ipc.close()
        tcp.close()
        prefill.core.shutdown()

    asyncio.run(main())
