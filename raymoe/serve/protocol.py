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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from raymoe.engine.sampling_params import (
    INT64_MAX,
    INT64_MIN,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_TOKEN_IDS,
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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


StopString = Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat completions (OpenAI's names, vLLM's extensions)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, le=INT64_MAX, description="-1 or 0: off")
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(
        None, description=f"up to 4 strings of 1 to {MAX_STOP_STRING_CHARS} characters"
    )
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    presence_penalty: float = Field(0.0, ge=0, le=0, description="penalties are not implemented")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="penalties are not implemented")
    user: str | None = None
    return_token_ids: bool = Field(False, description="vLLM's extension: choices[].token_ids in the response")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not 1 <= len(x) <= MAX_STOP_STRING_CHARS for x in stops):
            raise ValueError(f"each stop sequence has 1 to {MAX_STOP_STRING_CHARS} characters")
        return v or None

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v: list[int] | None) -> list[int] | None:
        if v and any(not 0 <= i <= INT64_MAX for i in v):
            raise ValueError("stop token ids are non-negative integers below 2**63")
        return v

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
            )
        except ValueError as exc:
            raise APIError(400, str(exc), param=str(exc).split(" ", 1)[0]) from None


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = Field(False, description="echo is not implemented")
    logprobs: int | None = Field(None, ge=0, le=0, description="logprobs are not implemented")

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, str):
            return p
        if p and all(isinstance(t, int) for t in p):
            return p  # type: ignore[return-value]
        if isinstance(p, list) and len(p) == 1:
            return p[0]  # type: ignore[return-value]
        raise APIError(400, "send one prompt per request (batched prompts are not supported)", param="prompt")


class TextPart(BaseModel):
    """A content part; only text parts are supported."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None

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
    logprobs: bool = Field(False, description="logprobs are not implemented")

    @field_validator("logprobs")
    @classmethod
    def _lp(cls, v: bool) -> bool:
        if v:
            raise ValueError("logprobs are not supported")
        return v


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


def completion_body(
    rid: str, model: str, text: str, finish_reason: str | None, use: dict[str, int], created: int
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": use,
    }


def completion_chunk(
    rid: str, model: str, text: str, finish_reason: str | None, created: int
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }


def chat_body(
    rid: str, model: str, text: str, finish_reason: str | None, use: dict[str, int], created: int
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": use,
    }


def chat_chunk(
    rid: str, model: str, delta: dict[str, Any], finish_reason: str | None, created: int
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage_chunk(rid: str, model: str, obj: str, use: dict[str, int], created: int) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def models_body(name: str, max_model_len: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "raymoe",
                "max_model_len": max_model_len,
            }
        ],
    }


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def openai_finish_reason(reason: str | None) -> str | None:
    """The engine's reasons in OpenAI's words ("abort" has no OpenAI name; it never reaches a client)."""
    return {"stop": "stop", "length": "length"}.get(reason or "", reason)
