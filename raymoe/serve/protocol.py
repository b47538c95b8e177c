"""The OpenAI HTTP protocol: request models, response bodies, the error shape.

Requests are validated here, at the edge, so every client mistake becomes a 400 with the
OpenAI error body naming the field, and nothing malformed reaches an engine: JSON without NaN or
Infinity, nesting at most `max_json_depth` deep, no lone UTF-16 surrogates in any string, and
every sampling field within what `SamplingParams` (and the tensors it becomes) can hold.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raymoe.engine.executor import PromptLogprobs
from raymoe.engine.sampling_params import (
    INT64_MAX,
    INT64_MIN,
    MAX_ALLOWED_TOKEN_IDS,
    MAX_BAD_WORDS,
    MAX_LOGIT_BIAS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOP_LOGPROBS,
    SamplingParams,
)
from raymoe.engine.structured import StructuredOutputsParams, check_grammar


class APIError(Exception):
    """An error that becomes an OpenAI error response (status, type, message, param)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class QueueFullError(Exception):
    """A replica's waiting queue is full: the ingress answers 503 `overloaded` with Retry-After."""


class UnitUnavailable(Exception):
    """The replica's deployment unit failed (e.g. a GPU worker died): 503 `unavailable` with Retry-After
    while Serve restarts the replica, and with it the whole unit (its workers are gang-created by the replica)."""


class RequestRejected(Exception):
    """The engine refused a request for a reason the client can fix (too long for the cache...): 400."""


def _refuse_unsupported(model: BaseModel, off: dict[str, tuple[Any, ...]], prefix: str = "") -> None:
    """APIError(400) naming the first field whose value asks for something this server does not do.

    `off`: field -> the values that ask for nothing (its defaults); any other value is refused by
    name rather than silently ignored (an application asking for JSON must not get free text)."""
    for name, neutral in off.items():
        value = getattr(model, name)
        if not any(value == v and type(value) is type(v) for v in neutral):
            raise APIError(
                400,
                f"{prefix}{name}={json.dumps(value)[:200]} is not supported by this server"
                f" (supported: {', '.join(json.dumps(v) for v in neutral)})",
                param=f"{prefix}{name}",
                code="unsupported_parameter",
            )


_NOT_SUPPORTED = "not supported yet: refused with 400 unless its default"
MAX_CHOICES = 128  # choices per response: prompts x n


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description=_NOT_SUPPORTED)

    @model_validator(mode="after")
    def _unsupported(self) -> StreamOptions:
        _refuse_unsupported(self, {"continuous_usage_stats": (False,)}, "stream_options.")
        return self


StopString = Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat completions (OpenAI's names, vLLM's extensions)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, le=INT64_MAX, description="-1 or 0: off")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="samples per prompt (seed + i for sample i)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(
        None, description=f"up to 4 strings of 1 to {MAX_STOP_STRING_CHARS} characters"
    )
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="minus this once per token already generated")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="minus this per occurrence in the output")
    repetition_penalty: float | None = Field(
        None, gt=0, le=1e6, description="vLLM's: divides (or multiplies, if negative) the logits of prompt and output tokens"
    )
    logit_bias: dict[str, float] | None = Field(
        None, max_length=MAX_LOGIT_BIAS, description="token id (as a string) -> bias in [-100, 100] added to its logit"
    )
    min_tokens: int = Field(0, ge=0, le=INT64_MAX, description="vLLM's: no EOS or stop token before this many")
    best_of: int | None = Field(None, ge=1, le=128, description=_NOT_SUPPORTED)
    response_format: dict[str, Any] | None = Field(
        None, description="text, json_object or json_schema ({name, schema, strict}): the output follows it"
    )
    user: str | None = None
    return_token_ids: bool = Field(False, description="vLLM's extension: choices[].token_ids in the response")
    min_p: float = Field(0.0, ge=0, le=1, description="vLLM's: drop tokens less likely than min_p x the most likely")
    include_stop_str_in_output: bool = Field(False, description="vLLM's: keep the matched stop string in the text")
    skip_special_tokens: bool = Field(True, description="vLLM's: false shows special tokens (EOS...) in the text")
    spaces_between_special_tokens: bool = Field(
        True, description="vLLM's: false joins adjacent special tokens (DeepSeek-V3's decoder never adds a space)"
    )
    truncate_prompt_tokens: int | None = Field(
        None, ge=1, le=INT64_MAX, description="vLLM's: keep only the prompt's last this many tokens"
    )
    allowed_token_ids: list[int] | None = Field(
        None, min_length=1, max_length=MAX_ALLOWED_TOKEN_IDS, description="vLLM's: only these tokens can be drawn"
    )
    bad_words: list[str] | None = Field(
        None, max_length=MAX_BAD_WORDS, description="vLLM's: words (one or more tokens) never generated"
    )
    prompt_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS,
        description="vLLM's: each prompt token's logprob and rank, with this many alternatives (not with stream)",
    )
    return_tokens_as_token_ids: bool = Field(False, description="vLLM's: logprobs name tokens `token_id:N`")
    # vLLM's extensions that raymoe does not honour yet: each is refused by name unless its default
    use_beam_search: bool = Field(False, description=_NOT_SUPPORTED)
    length_penalty: float = Field(1.0, description=_NOT_SUPPORTED)
    guided_json: str | dict[str, Any] | None = Field(None, description="vLLM's: the output follows this JSON schema")
    guided_regex: str | None = Field(None, description="vLLM's: the output matches this regex")
    guided_choice: list[str] | None = Field(None, description="vLLM's: the output is one of these strings")
    guided_grammar: str | None = Field(None, description="vLLM's: the output follows this grammar (Lark or GBNF)")
    guided_decoding_backend: str | None = Field(None, description="vLLM's: auto, guidance or llguidance (the one here)")
    guided_whitespace_pattern: str | None = Field(None, description="vLLM's: the whitespace JSON output may use")
    structured_outputs: dict[str, Any] | None = Field(
        None, description="vLLM 0.11's: one of json, regex, choice, grammar, json_object (+ whitespace options)"
    )
    priority: int = Field(0, description=_NOT_SUPPORTED)
    logits_processors: list[Any] | None = Field(None, description=_NOT_SUPPORTED)
    cache_salt: str | None = Field(None, description=_NOT_SUPPORTED)
    request_id: str | None = Field(None, description=_NOT_SUPPORTED)
    kv_transfer_params: dict[str, Any] | None = Field(None, description=_NOT_SUPPORTED)
    vllm_xargs: dict[str, Any] | None = Field(None, description=_NOT_SUPPORTED)

    # field -> the values that ask for nothing; anything else is a 400 naming the field (see
    # `_refuse_unsupported`). A feature leaves this table when it is implemented.
    _OFF: ClassVar[dict[str, tuple[Any, ...]]] = {
        "use_beam_search": (False,),
        "length_penalty": (1.0,),
        "priority": (0,),
        "logits_processors": (None, []),
        "cache_salt": (None,),
        "request_id": (None,),
        "kv_transfer_params": (None,),
        "vllm_xargs": (None,),
    }

    @model_validator(mode="after")
    def _unsupported(self) -> _SamplingFields:
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(
                400, f"best_of={self.best_of} (more samples than n={self.n} returned) is not supported by this server",
                param="best_of", code="unsupported_parameter",
            )
        _refuse_unsupported(self, self._OFF)
        if self.prompt_logprobs is not None and self.stream:
            raise APIError(400, "prompt_logprobs are not available when stream is true", param="prompt_logprobs")
        return self

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not 1 <= len(x) <= MAX_STOP_STRING_CHARS for x in stops):
            raise ValueError(f"each stop sequence has 1 to {MAX_STOP_STRING_CHARS} characters")
        return v or None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isascii() or not key.isdigit() or int(key) > INT64_MAX:
                raise ValueError(f"logit_bias keys are token ids (non-negative integers), got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values are in [-100, 100], got {bias!r}")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v: list[int] | None) -> list[int] | None:
        if v and any(not 0 <= i <= INT64_MAX for i in v):
            raise ValueError("stop token ids are non-negative integers below 2**63")
        return v

    def num_logprobs(self) -> int | None:
        """None: no logprobs; N: each token's logprob and its N most likely alternatives."""
        return None

    def num_prompt_logprobs(self) -> int | None:
        """None: no prompt logprobs; N: each prompt token's logprob and its N most likely alternatives."""
        return self.prompt_logprobs

    def sample_seed(self, sample: int) -> int | None:
        """Sample i of n draws with seed + i (vLLM's children): distinct, each reproducible; wraps within int64."""
        if self.seed is None:
            return None
        return (self.seed + sample - INT64_MIN) % (1 << 64) + INT64_MIN

    def structured_spec(self) -> StructuredOutputsParams | None:
        """The grammar the output must follow (response_format, guided_*, structured_outputs: at most one),
        checked to compile; APIError(400) naming the field otherwise."""
        specs: list[tuple[str, StructuredOutputsParams]] = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type")
            if kind == "json_object":
                specs.append(("response_format", StructuredOutputsParams(json_object=True)))
            elif kind == "json_schema":
                js = rf.get("json_schema")
                if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
                    raise APIError(400, "response_format.json_schema.schema must be a JSON schema object",
                                   param="response_format.json_schema.schema")
                specs.append(("response_format.json_schema.schema", StructuredOutputsParams(json=js["schema"])))
            elif kind != "text":
                raise APIError(400, f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                               param="response_format.type", code="unsupported_parameter")
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar")):
            value = getattr(self, name)
            if value is not None:
                specs.append((name, StructuredOutputsParams(**{key: value})))
        if self.structured_outputs is not None:
            specs.append(_structured_outputs(self.structured_outputs))
        if self.guided_decoding_backend not in (None, "auto", "guidance", "llguidance"):
            raise APIError(
                400, f"guided_decoding_backend={self.guided_decoding_backend!r}: this server's backend is llguidance "
                "(auto, guidance or llguidance)", param="guided_decoding_backend", code="unsupported_parameter",
            )
        if len(specs) > 1:
            raise APIError(400, f"{specs[1][0]}: only one of response_format, guided_* and structured_outputs "
                           f"may constrain the output (also given: {specs[0][0]})", param=specs[1][0])
        if not specs:
            return None
        param, spec = specs[0]
        if self.guided_whitespace_pattern is not None:
            spec.whitespace_pattern = self.guided_whitespace_pattern
        try:
            check_grammar(spec)
        except ValueError as exc:
            raise APIError(400, f"{param}: {exc}", param=param) from None
        return spec

    def sampling_params(self, max_tokens: int, structured: StructuredOutputsParams | None = None) -> SamplingParams:
        """`structured`: the grammar (already checked) from `structured_spec` or a tool choice."""
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                seed=self.seed,
                stop=self.stop,
                stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
                min_tokens=self.min_tokens,
                structured_outputs=structured,
                logprobs=self.num_logprobs() is not None,
                top_logprobs=self.num_logprobs() or 0,
                prompt_logprobs=self.num_prompt_logprobs(),
                min_p=self.min_p,
                allowed_token_ids=self.allowed_token_ids,
                bad_words=self.bad_words,
                include_stop_str_in_output=self.include_stop_str_in_output,
                skip_special_tokens=self.skip_special_tokens,
                spaces_between_special_tokens=self.spaces_between_special_tokens,
            )
        except ValueError as exc:
            raise APIError(400, str(exc), param=str(exc).split(" ", 1)[0]) from None


_STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")
# vLLM's StructuredOutputsParams fields and the values of those honoured only at their default
_STRUCTURED_OPTIONS = {
    "disable_fallback": (None, False, True),  # one backend: there is nothing to fall back to
    "disable_any_whitespace": (None, False, True),
    "disable_additional_properties": (None, False),
    "whitespace_pattern": None,
    "structural_tag": (None,),
}


def _structured_outputs(so: dict[str, Any]) -> tuple[str, StructuredOutputsParams]:
    """vLLM 0.11's `structured_outputs` object as (its field's name, the spec); APIError naming a bad key."""
    for key, value in so.items():
        if key in _STRUCTURED_KEYS:
            continue
        if key not in _STRUCTURED_OPTIONS:
            raise APIError(400, f"structured_outputs.{key} is not a structured-output field", param=f"structured_outputs.{key}")
        allowed = _STRUCTURED_OPTIONS[key]
        if allowed is not None and not any(value == v and type(value) is type(v) for v in allowed):
            raise APIError(400, f"structured_outputs.{key}={json.dumps(value)[:200]} is not supported by this server",
                           param=f"structured_outputs.{key}", code="unsupported_parameter")
    given = [k for k in _STRUCTURED_KEYS if so.get(k) not in (None, False)]
    if len(given) != 1:
        raise APIError(400, f"structured_outputs needs exactly one of {', '.join(_STRUCTURED_KEYS)}",
                       param="structured_outputs")
    spec = StructuredOutputsParams(
        **{given[0]: so[given[0]]},
        whitespace_flexible=so.get("disable_any_whitespace") is False,
        whitespace_pattern=so.get("whitespace_pattern"),
    )
    try:
        spec.validate()
    except ValueError as exc:
        raise APIError(400, str(exc), param=f"structured_outputs.{given[0]}") from None
    return f"structured_outputs.{given[0]}", spec


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0, le=INT64_MAX, description="0 with echo: the prompt alone (16 if unset)")
    echo: bool = Field(False, description="the choice's text (and logprobs) start with the prompt's")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="each token's logprob and this many most likely alternatives"
    )
    suffix: str | None = Field(None, description=_NOT_SUPPORTED)
    add_special_tokens: bool = Field(True, description=_NOT_SUPPORTED)
    prompt_embeds: str | list[str] | None = Field(None, description=_NOT_SUPPORTED)

    _OFF: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_SamplingFields._OFF,
        "suffix": (None,),
        "add_special_tokens": (True,),
        "prompt_embeds": (None,),
    }

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v: Any) -> Any:
        """One error naming `prompt` (not a union member) for a prompt of no accepted shape."""
        kinds = {type(x) for x in v} if isinstance(v, list) else set()
        if not isinstance(v, str | list) or len(kinds) > 1 or kinds - {int, str, list}:
            raise ValueError("prompt is a string, a list of token ids, or a list of strings or of token id lists")
        return v

    @model_validator(mode="after")
    def _echo_only(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens must be at least 1 (0 only with echo: the prompt alone)", param="max_tokens")
        return self

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def num_prompt_logprobs(self) -> int | None:
        """vLLM's: echo with logprobs needs the prompt's logprobs, as many alternatives as `logprobs`."""
        if self.prompt_logprobs is None and self.echo:
            return self.logprobs
        return self.prompt_logprobs

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one text, one token list, or a batch of either (one choice each x n)."""
        p = self.prompt
        if isinstance(p, str) or not p or all(isinstance(t, int) for t in p):
            prompts: list[str | list[int]] = [p]  # type: ignore[list-item]
        else:
            prompts = list(p)  # type: ignore[arg-type]
        if len(prompts) * self.n > MAX_CHOICES:
            raise APIError(
                400, f"{len(prompts)} prompts x n={self.n} choices: at most {MAX_CHOICES} per request",
                param="n" if self.n > 1 else "prompt",
            )
        return prompts


class TextPart(BaseModel):
    """A content part; only text parts are supported."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class FunctionDef(BaseModel):
    """A tool's function: its name, what it does and its arguments' JSON schema."""

    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = Field(None, description="accepted: with tool_choice required or named, arguments always follow parameters")


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDef


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str | dict[str, Any]

    def arguments_text(self) -> str:
        return self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments, ensure_ascii=False)


class ToolCallIn(BaseModel):
    """A call an earlier assistant turn made (in the history)."""

    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, description="accepted; the chat template does not render it")
    tool_calls: list[ToolCallIn] | None = Field(None, description="an assistant turn's calls (rendered in DeepSeek-V3's format)")
    tool_call_id: str | None = Field(None, description="a tool message's call (accepted; results render in order)")
    function_call: dict[str, Any] | None = Field(None, description=_NOT_SUPPORTED)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def num_chars(self) -> int:
        return len(self.content) if isinstance(self.content, str) else sum(len(p.text) for p in self.content or [])

    def template_message(self) -> dict[str, Any]:
        """The message as the chat template reads it (tool calls with their arguments as JSON text)."""
        calls = [
            {"type": c.type, "function": {"name": c.function.name, "arguments": c.function.arguments_text()}}
            for c in self.tool_calls or []
        ]
        return {"role": self.role, "content": self.text(), "tool_calls": calls or None}


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="each output token's logprob in choices[].logprobs.content")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="with logprobs: this many most likely alternatives per token"
    )
    tools: list[ToolDef] | None = Field(None, description="functions the model may call (DeepSeek-V3's tool-call format)")
    tool_choice: str | dict[str, Any] | None = Field(
        None, description='none, auto (the default with tools), required, or {"type": "function", "function": {"name"}}'
    )
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call per turn")
    functions: list[dict[str, Any]] | None = Field(None, description=_NOT_SUPPORTED)
    function_call: str | dict[str, Any] | None = Field(None, description=_NOT_SUPPORTED)
    echo: bool = Field(False, description="vLLM's: the reply starts with the last message's content if the assistant's")
    add_generation_prompt: bool = Field(True, description=_NOT_SUPPORTED)
    continue_final_message: bool = Field(False, description=_NOT_SUPPORTED)
    add_special_tokens: bool = Field(False, description=_NOT_SUPPORTED)
    chat_template: str | None = Field(None, description=_NOT_SUPPORTED)
    chat_template_kwargs: dict[str, Any] | None = Field(None, description=_NOT_SUPPORTED)
    documents: list[dict[str, Any]] | None = Field(None, description=_NOT_SUPPORTED)
    mm_processor_kwargs: dict[str, Any] | None = Field(None, description=_NOT_SUPPORTED)
    reasoning_effort: str | None = Field(None, description=_NOT_SUPPORTED)
    modalities: list[str] | None = Field(None, description=_NOT_SUPPORTED + " (text is the default)")
    audio: dict[str, Any] | None = Field(None, description=_NOT_SUPPORTED)
    prediction: dict[str, Any] | None = Field(None, description=_NOT_SUPPORTED)
    web_search_options: dict[str, Any] | None = Field(None, description=_NOT_SUPPORTED)
    store: bool | None = Field(None, description=_NOT_SUPPORTED)
    metadata: dict[str, str] | None = Field(None, description=_NOT_SUPPORTED)
    service_tier: str | None = Field(None, description=_NOT_SUPPORTED + " (auto and default are accepted)")

    _OFF: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_SamplingFields._OFF,
        "functions": (None, []),
        "function_call": (None, "none"),
        "add_generation_prompt": (True,),
        "continue_final_message": (False,),
        "add_special_tokens": (False,),
        "chat_template": (None,),
        "chat_template_kwargs": (None, {}),
        "documents": (None,),
        "mm_processor_kwargs": (None,),
        "reasoning_effort": (None,),
        "modalities": (None, ["text"]),
        "audio": (None,),
        "prediction": (None,),
        "web_search_options": (None,),
        "store": (None, False),
        "metadata": (None,),
        "service_tier": (None, "auto", "default"),
    }

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _unsupported_messages(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        for i, m in enumerate(self.messages):
            _refuse_unsupported(m, {"function_call": (None,)}, f"messages.{i}.")
        self.forced_tool()  # tool_choice checked against the tools
        return self

    def uses_tools(self) -> bool:
        """Whether the tools are rendered into the prompt and the output parsed for calls (tool_choice not none)."""
        return bool(self.tools) and self.tool_choice != "none"

    def forced_tool(self) -> tuple[bool, str | None]:
        """(whether a call is forced, the function it must call or None for any); APIError for a bad tool_choice."""
        choice = self.tool_choice
        names = [t.function.name for t in self.tools or []]
        if choice is None or choice in ("none", "auto"):
            return False, None
        if choice == "required":
            if not names:
                raise APIError(400, "tool_choice required needs tools", param="tool_choice")
            return True, None
        fn = choice.get("function") if isinstance(choice, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
            raise APIError(400, 'tool_choice is none, auto, required or {"type": "function", "function": {"name": ...}}',
                           param="tool_choice")
        if name not in names:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        return True, name


_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def check_json(data: Any, max_depth: int) -> None:
    """APIError(400) for nesting deeper than `max_depth` or a lone UTF-16 surrogate in any string
    (what the tokenizer, and the UTF-8 of any response, cannot hold). Iterative: no recursion limit."""
    stack: list[tuple[Any, int, tuple[Any, ...]]] = [(data, 1, ())]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                where = ".".join(str(x) for x in path) or None
                raise APIError(400, f"{where or 'request body'}: text contains an invalid UTF-16 surrogate", param=where)
            continue
        if depth > max_depth:
            raise APIError(400, f"request body is nested deeper than {max_depth} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                if _SURROGATE.search(key):
                    raise APIError(400, "a key contains an invalid UTF-16 surrogate", param=".".join(map(str, path)) or None)
                if isinstance(item, str | dict | list):
                    stack.append((item, depth + 1, (*path, key)))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, str | dict | list):
                    stack.append((item, depth + 1, (*path, i)))


def parse_json(raw: bytes, max_depth: int = 32) -> Any:
    """JSON bytes -> a checked value (see `check_json`), or APIError(400)."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise APIError(400, f"request body is nested deeper than {max_depth} levels") from None
    check_json(data, max_depth)
    return data


def parse_request(raw: bytes, model_cls: type[BaseModel], max_depth: int = 32) -> Any:
    """JSON bytes -> validated request, or APIError(400) naming the bad field."""
    data = parse_json(raw, max_depth)
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        param = ".".join(str(x) for x in e["loc"]) or None
        msg = "; ".join(f"{'.'.join(str(x) for x in x_['loc'])}: {x_['msg']}" for x_ in err.errors())
        raise APIError(400, msg, param=param) from None


def request_schemas() -> dict[str, Any]:
    """The request bodies' JSON schemas for /openapi.json: {route: schema ref} and the components."""
    components: dict[str, Any] = {}
    refs: dict[str, str] = {}
    for route, model in (("/v1/completions", CompletionRequest), ("/v1/chat/completions", ChatCompletionRequest)):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        refs[route] = f"#/components/schemas/{model.__name__}"
    return {"refs": refs, "components": components}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(slots=True)
class TokenLogprob:
    """One token for the logprobs of a response: its text, logprob and the alternatives (text, logprob).
    An echoed prompt's first token has neither (None: nothing predicts it)."""

    token: str
    logprob: float | None
    top: list[tuple[str, float]] | None


def completion_logprobs(tokens: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy completions shape; `offset`: where the first token's text starts in the choice's text."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) if t.top is not None else None for t in tokens],
        "text_offset": offsets,
    }


def prompt_logprobs_body(
    prompt: list[int], plp: PromptLogprobs, text: Callable[[int], str]
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: None for the first prompt token, then per position token id (as a string)
    -> {logprob, rank, decoded_token} for the prompt token and each alternative (-inf as -9999.0)."""
    out: list[dict[str, dict[str, Any]] | None] = [None]
    for i, (lp, rank) in enumerate(zip(plp.logprobs, plp.ranks, strict=True)):
        entry: dict[str, dict[str, Any]] = {}
        token = prompt[i + 1]
        entry[str(token)] = {"logprob": max(lp, -9999.0), "rank": rank, "decoded_token": text(token)}
        if plp.top is not None:
            for r, (t, v) in enumerate(zip(plp.top[i].token_ids, plp.top[i].logprobs, strict=True), start=1):
                entry.setdefault(str(t), {"logprob": max(v, -9999.0), "rank": r, "decoded_token": text(t)})
        out.append(entry)
    return out


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="surrogatepass"))


def chat_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    """The chat shape: per token its text, logprob, UTF-8 bytes and `top_logprobs` alternatives."""
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": _utf8(t.token),
                "top_logprobs": [{"token": s, "logprob": lp, "bytes": _utf8(s)} for s, lp in t.top or ()],
            }
            for t in tokens
        ],
        "refusal": None,
    }


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(
    index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message = {"role": "assistant", "content": text or None, "tool_calls": tool_calls}
    return {
        "index": index,
        "message": message,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }


def response_body(
    rid: str, model: str, chat: bool, choices: list[dict[str, Any]], use: dict[str, int], created: int
) -> dict[str, Any]:
    """A whole (non-streamed) response: `choices` from `completion_choice` / `chat_choice`, in index order."""
    obj = "chat.completion" if chat else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, "usage": use}


def completion_chunk(
    rid: str, model: str, index: int, text: str, finish_reason: str | None, created: int,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [completion_choice(index, text, finish_reason, logprobs)],
    }


def chat_chunk(
    rid: str, model: str, index: int, delta: dict[str, Any], finish_reason: str | None, created: int,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def usage_chunk(rid: str, model: str, obj: str, use: dict[str, int], created: int) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def models_body(name: str, root: str, max_model_len: int) -> dict[str, Any]:
    """/v1/models as vLLM shapes it: `root` (the checkpoint), `parent`, `max_model_len`, one `permission`."""
    created = int(time.time())
    permission = {
        "id": new_id("modelperm"),
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    card = {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "raymoe",
        "root": root,
        "parent": None,
        "max_model_len": max_model_len,
        "permission": [permission],
    }
    return {"object": "list", "data": [card]}


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def openai_finish_reason(reason: str | None) -> str | None:
    """The engine's reasons in OpenAI's words ("abort" has no OpenAI name; it never reaches a client)."""
    return {"stop": "stop", "length": "length"}.get(reason or "", reason)
