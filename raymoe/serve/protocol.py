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
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raymoe.engine.sampling_params import (
    INT64_MAX,
    INT64_MIN,
    MAX_LOGIT_BIAS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOP_LOGPROBS,
    SamplingParams,
)


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
    response_format: dict[str, Any] | None = Field(None, description=_NOT_SUPPORTED + " (type text is the default)")
    user: str | None = None
    return_token_ids: bool = Field(False, description="vLLM's extension: choices[].token_ids in the response")
    # vLLM's extensions that raymoe does not honour yet: each is refused by name unless its default
    min_p: float = Field(0.0, ge=0, le=1, description=_NOT_SUPPORTED)
    use_beam_search: bool = Field(False, description=_NOT_SUPPORTED)
    length_penalty: float = Field(1.0, description=_NOT_SUPPORTED)
    include_stop_str_in_output: bool = Field(False, description=_NOT_SUPPORTED)
    skip_special_tokens: bool = Field(True, description=_NOT_SUPPORTED)
    spaces_between_special_tokens: bool = Field(True, description=_NOT_SUPPORTED)
    truncate_prompt_tokens: int | None = Field(None, description=_NOT_SUPPORTED)
    allowed_token_ids: list[int] | None = Field(None, description=_NOT_SUPPORTED)
    bad_words: list[str] | None = Field(None, description=_NOT_SUPPORTED)
    prompt_logprobs: int | None = Field(None, description=_NOT_SUPPORTED)
    guided_json: str | dict[str, Any] | None = Field(None, description=_NOT_SUPPORTED)
    guided_regex: str | None = Field(None, description=_NOT_SUPPORTED)
    guided_choice: list[str] | None = Field(None, description=_NOT_SUPPORTED)
    guided_grammar: str | None = Field(None, description=_NOT_SUPPORTED)
    guided_decoding_backend: str | None = Field(None, description=_NOT_SUPPORTED)
    guided_whitespace_pattern: str | None = Field(None, description=_NOT_SUPPORTED)
    structured_outputs: dict[str, Any] | None = Field(None, description=_NOT_SUPPORTED)
    priority: int = Field(0, description=_NOT_SUPPORTED)
    logits_processors: list[Any] | None = Field(None, description=_NOT_SUPPORTED)
    return_tokens_as_token_ids: bool = Field(False, description=_NOT_SUPPORTED)
    cache_salt: str | None = Field(None, description=_NOT_SUPPORTED)
    request_id: str | None = Field(None, description=_NOT_SUPPORTED)
    kv_transfer_params: dict[str, Any] | None = Field(None, description=_NOT_SUPPORTED)
    vllm_xargs: dict[str, Any] | None = Field(None, description=_NOT_SUPPORTED)

    # field -> the values that ask for nothing; anything else is a 400 naming the field (see
    # `_refuse_unsupported`). A feature leaves this table when it is implemented.
    _OFF: ClassVar[dict[str, tuple[Any, ...]]] = {
        "response_format": (None, {"type": "text"}),
        "min_p": (0.0,),
        "use_beam_search": (False,),
        "length_penalty": (1.0,),
        "include_stop_str_in_output": (False,),
        "skip_special_tokens": (True,),
        "spaces_between_special_tokens": (True,),
        "truncate_prompt_tokens": (None,),
        "allowed_token_ids": (None,),
        "bad_words": (None, []),
        "prompt_logprobs": (None,),
        "guided_json": (None,),
        "guided_regex": (None,),
        "guided_choice": (None,),
        "guided_grammar": (None,),
        "guided_decoding_backend": (None,),
        "guided_whitespace_pattern": (None,),
        "structured_outputs": (None,),
        "priority": (0,),
        "logits_processors": (None, []),
        "return_tokens_as_token_ids": (False,),
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

    def sample_seed(self, sample: int) -> int | None:
        """Sample i of n draws with seed + i (vLLM's children): distinct, each reproducible; wraps within int64."""
        if self.seed is None:
            return None
        return (self.seed + sample - INT64_MIN) % (1 << 64) + INT64_MIN

    def sampling_params(self, max_tokens: int) -> SamplingParams:
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
                logprobs=self.num_logprobs() is not None,
                top_logprobs=self.num_logprobs() or 0,
            )
        except ValueError as exc:
            raise APIError(400, str(exc), param=str(exc).split(" ", 1)[0]) from None


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = Field(False, description=_NOT_SUPPORTED)
    logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="each token's logprob and this many most likely alternatives"
    )
    suffix: str | None = Field(None, description=_NOT_SUPPORTED)
    add_special_tokens: bool = Field(True, description=_NOT_SUPPORTED)
    prompt_embeds: str | list[str] | None = Field(None, description=_NOT_SUPPORTED)

    _OFF: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_SamplingFields._OFF,
        "echo": (False,),
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

    def num_logprobs(self) -> int | None:
        return self.logprobs

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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, description="accepted; the chat template does not render it")
    tool_calls: list[dict[str, Any]] | None = Field(None, description=_NOT_SUPPORTED)
    function_call: dict[str, Any] | None = Field(None, description=_NOT_SUPPORTED)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def num_chars(self) -> int:
        return len(self.content) if isinstance(self.content, str) else sum(len(p.text) for p in self.content or [])


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="each output token's logprob in choices[].logprobs.content")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="with logprobs: this many most likely alternatives per token"
    )
    tools: list[dict[str, Any]] | None = Field(None, description=_NOT_SUPPORTED)
    tool_choice: str | dict[str, Any] | None = Field(None, description=_NOT_SUPPORTED + " (none is the default)")
    parallel_tool_calls: bool | None = Field(None, description=_NOT_SUPPORTED)
    functions: list[dict[str, Any]] | None = Field(None, description=_NOT_SUPPORTED)
    function_call: str | dict[str, Any] | None = Field(None, description=_NOT_SUPPORTED)
    echo: bool = Field(False, description=_NOT_SUPPORTED)
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
        "tools": (None, []),
        "tool_choice": (None, "none"),
        "parallel_tool_calls": (None, True, False),
        "functions": (None, []),
        "function_call": (None, "none"),
        "echo": (False,),
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
            _refuse_unsupported(m, {"tool_calls": (None, []), "function_call": (None,)}, f"messages.{i}.")
        return self


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
    """One output token for the logprobs of a response: its text, logprob and the alternatives (text, logprob)."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


def completion_logprobs(tokens: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy completions shape; `offset`: where the first token's text starts in the choice's text."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) for t in tokens],
        "text_offset": offsets,
    }


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
                "top_logprobs": [{"token": s, "logprob": lp, "bytes": _utf8(s)} for s, lp in t.top],
            }
            for t in tokens
        ],
        "refusal": None,
    }


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
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
