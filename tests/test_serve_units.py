"""Serving pieces without a cluster: request parsing, incremental detokenization, routing order, dashboard."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from raymoe.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_request

ROOT = Path(__file__).resolve().parents[1]


def test_parse_request_names_the_field() -> None:
    req = parse_request(b'{"model": "m", "prompt": [1, 2, 3], "max_tokens": 4}', CompletionRequest)
    assert req.prompts() == [[1, 2, 3]]
    assert req.sampling_params(4).max_tokens == 4
    with pytest.raises(APIError) as e:
        parse_request(b'{"model": "m", "prompt": "x", "top_p": 1.5}', CompletionRequest)
    assert e.value.status == 400 and e.value.param == "top_p"
    with pytest.raises(APIError) as e:
        parse_request(b"\xff\xfe", CompletionRequest)
    assert "not valid JSON" in e.value.message
    batch = parse_request(b'{"model": "m", "prompt": ["a", "b"], "n": 2}', CompletionRequest)
    assert batch.prompts() == ["a", "b"] and [batch.sample_seed(i) for i in range(2)] == [None, None]
    assert parse_request(b'{"model": "m", "prompt": [[1], [2, 3]]}', CompletionRequest).prompts() == [[1], [2, 3]]
    seeded = parse_request(b'{"model": "m", "prompt": "x", "seed": 9223372036854775807, "n": 3}', CompletionRequest)
    assert [seeded.sample_seed(i) for i in range(3)] == [2**63 - 1, -(2**63), -(2**63) + 1]  # wraps within int64
    with pytest.raises(APIError) as e:
        parse_request(b'{"model": "m", "prompt": ["a", "b"], "n": 100}', CompletionRequest).prompts()
    assert e.value.param == "n"
    with pytest.raises(APIError) as e:
        parse_request(b'{"model": "m", "prompt": "x", "stop": ["a","b","c","d","e"]}', CompletionRequest)
    assert e.value.param == "stop"
    chat = parse_request(
        json.dumps({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}).encode(),
        ChatCompletionRequest,
    )
    assert chat.messages[0].text() == "hi"


def test_detokenizer_holds_partial_characters_and_stop_prefixes() -> None:
    from raymoe.engine.output_processor import IncrementalDetokenizer
    from raymoe.model.tiny import default_checkpoint
    from raymoe.model.tokenizer import Tokenizer

    tok = Tokenizer.from_checkpoint(default_checkpoint())
    assert tok is not None
    text = "experts über alles, done"
    ids = tok.encode(text, add_bos=False)
    d = IncrementalDetokenizer(tok, hold=3)
    streamed = "".join(d.push([t]) for t in ids)
    assert "\ufffd" not in streamed and text.startswith(streamed) and len(streamed) <= len(text) - 3
    assert streamed + d.finish(None) == text
    # a stop string ", d" (hold 2): what was streamed never reaches into the cut-off match
    d3 = IncrementalDetokenizer(tok, hold=2)
    sent, pushed = "", []
    for t in ids:  # the chunk completing the stop string finishes the request: it is never pushed
        pushed.append(t)
        if ", d" in tok.decode(pushed):
            break
        sent += d3.push([t])
    final = text[: text.index(", d")]
    assert final.startswith(sent)
    assert sent + d3.finish(final) == final


def test_output_batch_keeps_its_fields_through_ray_pickling() -> None:
    """A stream message pickles as rows of field values; every field, error kind included, comes back."""
    import pickle

    import ray.cloudpickle as cloudpickle

    from raymoe.serve.server import OutputBatch, OutputDelta

    batch = OutputBatch([
        OutputDelta("a", [1, 2]),
        OutputDelta("b", [7], True, "stop", "the end"),
        OutputDelta("c", [], True, error="prefill replica x: gone", error_kind="unavailable"),
        OutputDelta("d", [], True, error="too long", error_kind="rejected"),
    ])
    back = pickle.loads(cloudpickle.dumps(batch))
    assert back == batch and isinstance(back.deltas[2], OutputDelta)
    assert (back.deltas[3].error, back.deltas[3].error_kind, back.deltas[1].text) == ("too long", "rejected", "the end")


def test_replica_id_falls_back_only_outside_a_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside a Serve replica the id is "local"; any other failure to read it is an error, not "local"."""
    from ray import serve

    from raymoe.serve.server import _replica_id

    assert _replica_id() == "local"

    def broken() -> None:
        raise RuntimeError("controller unreachable")

    monkeypatch.setattr(serve, "get_replica_context", broken)
    with pytest.raises(RuntimeError, match="controller unreachable"):
        _replica_id()


def test_router_orders_replicas() -> None:
    from raymoe.serve.routing import EngineLoadRouter

    class Probe(EngineLoadRouter):
        def __init__(self, policy: str, in_flight: dict[str, int]) -> None:
            self.initialize_state(policy=policy)
            self.flights = in_flight

        def _in_flight(self, replica: SimpleNamespace) -> int:  # type: ignore[override]
            return self.flights[replica.replica_id]

    def rep(name: str, free: int, waiting: int = 0) -> SimpleNamespace:
        return SimpleNamespace(replica_id=name, routing_stats={"kv_blocks_free": free, "kv_blocks_total": 100, "waiting": waiting})

    a, b, c = rep("a", 2), rep("b", 50, waiting=3), rep("c", 90)
    kv = Probe("kv_room", {"a": 0, "b": 1, "c": 4})
    # a has almost no KV room: last despite being idle; then fewest in flight
    assert [r.replica_id for r in kv.rank([a, b, c])] == ["b", "c", "a"]
    ll = Probe("least_loaded", {"a": 0, "b": 1, "c": 2})
    assert [r.replica_id for r in ll.rank([a, b, c])] == ["a", "c", "b"]
    with pytest.raises(ValueError, match="unknown policy"):
        Probe("random", {})


def test_grafana_dashboard_uses_exported_metrics() -> None:
    dash = json.loads((ROOT / "grafana/raymoe-serving.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"ray_(raymoe_\w+)", e)}
    source = "".join((ROOT / f).read_text() for f in ("raymoe/serve/metrics.py", "raymoe/eplb/metrics.py"))
    defined = set(re.findall(r'"(raymoe_\w+)"', source))
    assert used and used <= defined, used - defined
    assert {"raymoe_ttft_seconds", "raymoe_tpot_seconds", "raymoe_kv_blocks_used", "raymoe_kv_handoff_bytes_total"} <= used


def test_replica_hot_path_options() -> None:
    """Serve accepts the logging and event-loop options every deployment gets; both can be turned back."""
    from ray import serve

    from raymoe.serve.app import _replica_options, _runtime_env
    from raymoe.serve.config import ServeConfig

    class Probe:
        pass

    cfg = ServeConfig()
    dep = serve.deployment(Probe).options(**_replica_options(cfg), ray_actor_options={"runtime_env": _runtime_env(cfg)})
    assert dep.logging_config["log_level"] == "WARNING"
    assert dep.logging_config["enable_access_log"] is False
    env = dep.ray_actor_options["runtime_env"]["env_vars"]
    assert env == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
    old = ServeConfig(single_event_loop=False, log_level="INFO", access_log=True)
    dep = serve.deployment(Probe).options(**_replica_options(old), ray_actor_options={"runtime_env": _runtime_env(old)})
    assert dep.logging_config["log_level"] == "INFO" and dep.logging_config["enable_access_log"] is True
    assert dep.ray_actor_options["runtime_env"] == {}
    with pytest.raises(ValueError, match="log_level"):
        ServeConfig(log_level="LOUD")
