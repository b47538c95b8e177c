"""Structured output (grammar-masked sampling) and DeepSeek-V3 tool calls.

With random weights the model writes noise, so only the grammar makes its output valid: every
output here is checked with `jsonschema` (or the regex / choice it must match). Strings carry a
maxLength and objects additionalProperties false, so that the grammar, not max_tokens, ends them.
One disaggregated Serve app (deployments/local.yaml: prefill samples the first token, decode
continues the grammar) serves the HTTP tests through the official `openai` client.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import torch
import yaml

from raymoe.engine.executor import SamplingMetadata
from raymoe.engine.sampler import Sampler
from raymoe.engine.sampling_params import SamplingParams
from raymoe.engine.structured import StructuredOutputsParams, check_grammar
from raymoe.llm import LLM
from raymoe.model.tiny import default_checkpoint
from raymoe.model.tokenizer import Tokenizer
from raymoe.serve.tools import (
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN,
    CALLS_END,
    SEP,
    TOOL_CHAT_TEMPLATE,
    ToolCallStream,
    ToolTokens,
    parse_tool_calls,
    tools_system_prompt,
)

ROOT = Path(__file__).resolve().parents[1]

SCHEMAS: dict[str, dict[str, Any]] = {
    "object_required": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
        "required": ["color", "ok"],
        "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {"xs": {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 9},
                              "minItems": 1, "maxItems": 4}},
        "required": ["xs"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                               "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
                "required": ["id", "tags"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    "numbers": {
        "type": "object",
        "properties": {"x": {"type": "number", "minimum": -10, "maximum": 10}, "n": {"type": "integer"}},
        "required": ["x", "n"],
        "additionalProperties": False,
    },
}

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                        "unit": {"enum": ["c", "f"]}},
                       "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                                        "b": {"type": "integer", "minimum": 0, "maximum": 999}},
                       "required": ["a", "b"], "additionalProperties": False}}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


# --- pure units ---------------------------------------------------------------------------------
def test_parse_crafted_tool_calls() -> None:
    call = f"{CALL_BEGIN}function{SEP}get_weather\n```json\n{{\"city\": \"Paris\", \"unit\": \"c\"}}\n```{CALL_END}"
    call2 = f"{CALL_BEGIN}function{SEP}add\n```json\n{{\"a\": 1, \"b\": 2}}\n```{CALL_END}"
    text = f"Let me check.{CALLS_BEGIN}{call}\n{call2}{CALLS_END}"
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "c"}), ("add", {"a": 1, "b": 2})
    ]
    assert calls[0].body()["type"] == "function" and calls[0].id != calls[1].id
    assert [c.name for c in parse_tool_calls(text, parallel=False)[1]] == ["get_weather"]
    assert parse_tool_calls("no calls here") == ("no calls here", [])
    cut = f"text{CALLS_BEGIN}{CALL_BEGIN}function{SEP}add\n```json\n{{\"a\""  # cut off mid-call: content as written
    assert parse_tool_calls(cut) == (cut, [])


def test_tool_call_stream_gives_each_call_when_it_closes() -> None:
    """Content streams until the calls begin; each call comes out at its call-end token, whole."""
    tok = Tokenizer.from_checkpoint(default_checkpoint())
    assert tok is not None
    tokens = ToolTokens.of(tok)
    assert tokens is not None
    call = f"{CALL_BEGIN}function{SEP}add\n```json\n{{\"a\":1,\"b\":2}}\n```{CALL_END}"
    ids = tok.encode(f"Sure, adding.{CALLS_BEGIN}{call}\n{call}{CALLS_END}", add_bos=False)
    stream = ToolCallStream(tok, tokens, parallel=True)
    shown, seen = "", []
    for i in ids:
        text, calls = stream.push([i], tok.decode([i]))
        shown += text
        seen.append(len(calls))
        if calls:
            assert i == tokens.call_end and json.loads(calls[0].arguments) == {"a": 1, "b": 2}
    rest, calls = stream.finish()
    assert shown + rest == "Sure, adding." and not calls
    assert sum(seen) == 2 == stream.num_calls
    single = ToolCallStream(tok, tokens, parallel=False)
    assert sum(len(single.push([i], tok.decode([i]))[1]) for i in ids) == 1


def test_tools_and_tool_history_render_in_deepseek_format() -> None:
    tok = Tokenizer.from_checkpoint(default_checkpoint())
    assert tok is not None
    messages = [
        {"role": "system", "content": "Be brief.\n\n" + tools_system_prompt(TOOLS), "tool_calls": None},
        {"role": "user", "content": "Add 2 and 3", "tool_calls": None},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "content": "5", "tool_calls": None},
    ]
    prompt = tok.apply_chat_template(messages, chat_template=TOOL_CHAT_TEMPLATE)
    assert json.dumps(TOOLS[1]["function"]) in prompt and "You have the following functions available" in prompt
    call = f"{CALL_BEGIN}function{SEP}add\n```json\n{{\"a\": 2, \"b\": 3}}\n```{CALL_END}"
    assert prompt.endswith(
        f"<｜User｜>Add 2 and 3<｜Assistant｜>{CALLS_BEGIN}{call}{CALLS_END}<｜end▁of▁sentence｜>"
        "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>5<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
    )


def test_bad_specs_are_value_errors_naming_the_field() -> None:
    with pytest.raises(ValueError, match="structured_outputs.json"):
        check_grammar(StructuredOutputsParams(json={"type": "foo"}))
    with pytest.raises(ValueError, match="structured_outputs.regex"):
        check_grammar(StructuredOutputsParams(regex="(unclosed"))
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(regex="a", choice=["b"]).validate()
    with pytest.raises(ValueError, match="structured_outputs.choice"):
        SamplingParams(structured_outputs=StructuredOutputsParams(choice=[]))


def _md(n: int, bitmask: torch.Tensor | None) -> SamplingMetadata:
    return SamplingMetadata(
        temperatures=torch.zeros(n), top_ps=torch.ones(n), top_ks=torch.zeros(n, dtype=torch.long),
        seeds=[None] * n, output_indices=[0] * n, all_greedy=True, needs_logprobs=True, any_top_p=False,
        any_top_k=False, grammar_bitmask=bitmask,
    )


def test_sampler_masks_to_the_grammar_and_keeps_raw_logprobs() -> None:
    vocab = 70
    logits = torch.randn(4, vocab)
    mask = torch.full((4, 3), -1, dtype=torch.int32)  # row 0: no grammar
    mask[1] = 0
    mask[1, 1] = 1 << 5  # row 1: only token 37
    mask[2] = 0
    mask[2, 2] = 0b11  # row 2: tokens 64 and 65
    mask[3] = 0
    mask[3, 0] = (1 << 13) - (1 << 31)  # row 3: tokens 13 and 31 (the sign bit)
    out = Sampler()(logits, _md(4, mask))
    assert out.token_ids[0] == int(logits[0].argmax())
    assert out.token_ids[1] == 37
    assert out.token_ids[2] == 64 + int(logits[2, 64:66].argmax())
    assert out.token_ids[3] == (13 if logits[3, 13] > logits[3, 31] else 31)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs == pytest.approx([float(raw[r, t]) for r, t in enumerate(out.token_ids)], abs=1e-5)
    # no grammar in the step: the metadata carries none and the draw is the plain argmax
    assert Sampler()(logits, _md(4, None)).token_ids == logits.argmax(dim=-1).tolist()


# --- the single-process engine ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    llm = LLM(model=default_checkpoint(), kv_cache_tokens=8192, max_model_len=2048)
    yield llm
    llm.shutdown()


def test_engine_json_schemas_validate(llm: LLM) -> None:
    names = list(SCHEMAS)
    params = [
        SamplingParams(max_tokens=160, temperature=1.0, seed=i, structured_outputs=StructuredOutputsParams(json=SCHEMAS[n]))
        for i, n in enumerate(names)
    ]
    outs = llm.generate(["Hello, my name is"] * len(names), params, use_tqdm=False)
    for name, out in zip(names, outs, strict=True):
        assert out.finish_reason == "stop", (name, out.text)
        jsonschema.validate(json.loads(out.text), SCHEMAS[name])


def test_engine_plain_rows_unchanged_beside_a_grammar(llm: LLM) -> None:
    """A request without structure samples exactly as before, whether or not a constrained row shares its steps."""
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = llm.generate(["The quick brown fox"], plain, use_tqdm=False)[0].token_ids
    constrained = SamplingParams(max_tokens=12, temperature=0.0, structured_outputs=StructuredOutputsParams(regex="[a-z ]{12}"))
    mixed = llm.generate(["The quick brown fox", "Hello"], [plain, constrained], use_tqdm=False)
    assert mixed[0].token_ids == alone
    assert re.fullmatch("[a-z ]{12}", mixed[1].text) and mixed[1].finish_reason == "stop"
    assert not llm.engine.structured.active  # every matcher released


def test_engine_handoff_replays_the_grammar(llm: LLM) -> None:
    """Prefill samples the first token under the grammar, a fresh matcher on decode replays it and continues."""
    engine = llm.engine
    spec = StructuredOutputsParams(json=SCHEMAS["enum"])
    params = SamplingParams(max_tokens=64, temperature=1.0, seed=3, structured_outputs=spec)
    engine.add_request("p", "Hello", params, prefill_only=True)
    while engine.has_unfinished_requests():
        engine.step()
    handoff = engine.export_kv("p")
    engine.add_request_with_kv("d", handoff, params)
    tokens = [handoff.first_token_id]
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.new_token_ids
            reason = out.finish_reason
    assert reason == "stop"
    jsonschema.validate(json.loads(engine.tokenizer.decode(tokens)), SCHEMAS["enum"])


def test_engine_refuses_a_grammar_it_cannot_compile(llm: LLM) -> None:
    with pytest.raises(ValueError, match="structured_outputs.grammar"):
        llm.engine.add_request("bad", "Hello", SamplingParams(structured_outputs=StructuredOutputsParams(grammar="start: (")))
    assert "bad" not in llm.engine.requests


# --- the expert-parallel unit ----------------------------------------------------------------------
def test_expert_parallel_unit_masks_on_the_workers(ray_cluster: Any) -> None:
    """The bitmask rides the step's SamplingMetadata to TP rank 0 of the workers, which samples with it."""
    from raymoe.parallel.config import ParallelConfig

    spec = StructuredOutputsParams(json=SCHEMAS["object_required"])
    params = [SamplingParams(max_tokens=80, temperature=1.0, seed=i, structured_outputs=spec) for i in range(2)]
    with LLM(model=str(default_checkpoint()), kv_cache_tokens=512, block_size=8,
             parallel=ParallelConfig(nodes=1, gpus_per_node=2, replica_choice="static")) as ep:
        outs = ep.generate(["Hello", "The weather"], params, use_tqdm=False)
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMAS["object_required"])


# --- the OpenAI API over HTTP ----------------------------------------------------------------------
def _args() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "deployments/local.yaml").read_text())
    args = doc["applications"][0]["args"]
    assert args["disaggregated"] is True  # the default: the grammar crosses the prefill -> decode handoff
    for unit in ("prefill", "decode"):
        args[unit].update(torch_threads=1, max_waiting_requests=8)
        args[unit]["deployment"]["ray_actor_options"]["num_cpus"] = 0.25
        args[unit]["engine"].update(kv_cache_tokens=8192, max_num_seqs=16)
    args["ingress"]["deployment"]["ray_actor_options"]["num_cpus"] = 0.05
    return args


@pytest.fixture(scope="module")
def base(serve_http: Any) -> Iterator[str]:
    from ray import serve

    from raymoe.serve.app import build_app

    try:
        serve.run(build_app(_args()), name="raymoe-structured", route_prefix="/structured")
        yield f"{serve_http.base}/structured"
    finally:
        serve.delete("raymoe-structured")


@pytest.fixture(scope="module")
def client(base: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client: Any) -> str:
    return client.models.list().data[0].id


def _schema_format(name: str) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_chat_validates(client: Any, model: str, name: str) -> None:
    resp = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Describe someone."}], max_tokens=160,
        temperature=1.0, seed=11, response_format=_schema_format(name),
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])


def test_json_schema_streamed_and_n(client: Any, model: str) -> None:
    name = "nested"
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=160, temperature=1.0, seed=5,
        response_format=_schema_format(name), stream=True,
    )
    parts: list[str] = []
    reasons = []
    for chunk in stream:
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert reasons[-1] == "stop" and len([p for p in parts if p]) > 1  # really streamed, piece by piece
    jsonschema.validate(json.loads("".join(parts)), SCHEMAS[name])
    resp = client.completions.create(
        model=model, prompt="Numbers:", max_tokens=160, temperature=1.0, seed=7, n=3,
        extra_body={"guided_json": SCHEMAS["array"]},
    )
    assert len(resp.choices) == 3 and len({c.text for c in resp.choices}) > 1
    for c in resp.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), SCHEMAS["array"])


def test_json_object_choice_regex(client: Any, model: str) -> None:
    # a bias towards '"' closes every string at once: random weights would write one for hundreds of tokens
    tok = Tokenizer.from_checkpoint(default_checkpoint())
    assert tok is not None
    q = tok.token_to_id('"')
    resp = client.completions.create(
        model=model, prompt="JSON:", max_tokens=200, temperature=1.0, seed=1,
        logit_bias={str(q): 20}, extra_body={"response_format": {"type": "json_object"}},  # vLLM's, on completions
    )
    assert resp.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(resp.choices[0].text), dict)
    choices = ["alpha", "beta", "gamma delta"]
    for seed in range(3):
        resp = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Pick"}], max_tokens=20, seed=seed,
            extra_body={"guided_choice": choices},
        )
        assert resp.choices[0].message.content in choices
    resp = client.completions.create(
        model=model, prompt="Date:", max_tokens=30, seed=2, extra_body={"guided_regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"},
    )
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", resp.choices[0].text)
    resp = client.completions.create(
        model=model, prompt="Code:", max_tokens=30, seed=4,
        extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{3}"}, "guided_decoding_backend": "guidance"},
    )
    assert re.fullmatch("[A-Z]{3}-[0-9]{3}", resp.choices[0].text)
    resp = client.completions.create(
        model=model, prompt="Yes or no:", max_tokens=30, seed=4,
        extra_body={"guided_grammar": 'root ::= "yes" | "no"'},  # GBNF, as vLLM's xgrammar reads it
    )
    assert resp.choices[0].text in ("yes", "no")


def _status(base: str, route: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    r = httpx.post(f"{base}/v1/{route}", json=body, timeout=60)
    return r.status_code, r.json()


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_grammar": "start: ("}, "guided_grammar"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
        ({"guided_regex": "a", "guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
        ({"structured_outputs": {"regex": "a", "frobnicate": 1}}, "structured_outputs.frobnicate"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}],
          "tool_choice": "required"}, "tools"),
        ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
    ],
)
def test_bad_structure_is_a_400_naming_the_field(base: str, model: str, extra: dict[str, Any], param: str) -> None:
    status, body = _status(base, "chat/completions", {"model": model, "messages": [{"role": "user", "content": "x"}],
                                                       "max_tokens": 4, **extra})
    assert status == 400, body
    assert body["error"]["param"] == param, body


def _check_calls(message: Any, names: set[str], at_most_one: bool) -> None:
    assert message.tool_calls, message
    if at_most_one:
        assert len(message.tool_calls) == 1
    for call in message.tool_calls:
        assert call.type == "function" and call.id and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def test_tool_choice_required_and_named(client: Any, model: str) -> None:
    messages = [{"role": "system", "content": "You help."}, {"role": "user", "content": "Weather in Paris?"}]
    for seed in range(2):
        resp = client.chat.completions.create(
            model=model, messages=messages, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
            max_tokens=200, seed=seed,
        )
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        _check_calls(choice.message, {"get_weather", "add"}, at_most_one=True)
    resp = client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, max_tokens=400, seed=3,
        tool_choice={"type": "function", "function": {"name": "add"}},
    )
    assert resp.choices[0].finish_reason == "tool_calls"
    _check_calls(resp.choices[0].message, {"add"}, at_most_one=False)
    # the same request streamed: the same calls, each whole in one delta, indexed in order
    stream = client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, max_tokens=400, seed=3, stream=True,
        tool_choice={"type": "function", "function": {"name": "add"}},
    )
    deltas = [d for chunk in stream for c in chunk.choices for d in c.delta.tool_calls or []]
    assert [d.index for d in deltas] == list(range(len(deltas)))
    want = [(t.function.name, t.function.arguments) for t in resp.choices[0].message.tool_calls]
    assert [(d.function.name, d.function.arguments) for d in deltas] == want


def test_tool_calls_streamed_and_history_rendered(client: Any, model: str) -> None:
    history = [
        {"role": "user", "content": "Add 2 and 3"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
        {"role": "user", "content": "And the weather?"},
    ]
    stream = client.chat.completions.create(
        model=model, messages=history, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False, max_tokens=200, seed=1, stream=True,
    )
    calls: list[Any] = []
    reasons = []
    for chunk in stream:
        for c in chunk.choices:
            calls += c.delta.tool_calls or []
            reasons.append(c.finish_reason)
    assert reasons[-1] == "tool_calls" and len(calls) == 1
    assert calls[0].index == 0 and calls[0].function.name == "get_weather" and calls[0].id
    jsonschema.validate(json.loads(calls[0].function.arguments), PARAMS["get_weather"])
    # tool_choice none: the tools are neither rendered nor parsed, the output is plain content
    resp = client.chat.completions.create(model=model, messages=history, tools=TOOLS, tool_choice="none",
                                          max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert resp.choices[0].message.tool_calls is None and resp.choices[0].finish_reason == "length"
    auto = client.chat.completions.create(model=model, messages=history, tools=TOOLS, max_tokens=1, temperature=0)
    assert auto.usage.prompt_tokens > resp.usage.prompt_tokens + 100  # "auto": the tools are in the prompt
