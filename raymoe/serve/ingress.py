"""The OpenAI-compatible ingress: parses and validates requests, drives prefill -> decode (or one
unit), detokenizes, and measures what the client sees (TTFT, TPOT).

Each unit replica holds a request for as long as the ingress's call to it (`decode`/`generate`)
is open; the tokens come back on that replica's one output stream to this ingress replica
(`stream_outputs`, read by `_pump`) and are demultiplexed into the request's queue.

The edge (`raymoe.serve.edge.EdgeMiddleware` on every route, and the exception handlers) answers
every client mistake in the OpenAI error shape before any route runs: 401 without a valid API
key on /v1/*, 413 for a body over `max_request_bytes` (from Content-Length, and counted while
the body streams in), 415 for a body that is not JSON, 404/405 for unknown routes and methods.
Parsing, chat templating and tokenization run on a small thread pool, after a prompt-length
bound that needs no tokenizer, so a large prompt never stalls the event loop (/health included).

No `from __future__ import annotations` here: FastAPI reads the route signatures at run time.
"""


import asyncio
import contextvars
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayError, RayTaskError, TaskCancelledError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from raymoe.engine.config import resolve_max_model_len
from raymoe.engine.executor import PromptLogprobs, TopLogprobs
from raymoe.engine.output_processor import IncrementalDetokenizer
from raymoe.engine.sampling_params import SamplingParams
from raymoe.engine.structured import StructuredOutputsParams, check_grammar
from raymoe.serve import edge
from raymoe.serve.config import ServeConfig
from raymoe.serve.protocol import (
    SSE_DONE,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    QueueFullError,
    RequestRejected,
    TokenLogprob,
    UnitUnavailable,
    chat_choice,
    chat_chunk,
    chat_logprobs,
    completion_choice,
    completion_chunk,
    completion_logprobs,
    models_body,
    new_id,
    openai_finish_reason,
    parse_request,
    prompt_logprobs_body,
    request_schemas,
    response_body,
    sse,
    usage,
    usage_chunk,
)
from raymoe.serve.server import OutputDelta, TokenChunk, _replica_id
from raymoe.serve.tools import (
    TOOL_CHAT_TEMPLATE,
    ToolCallStream,
    ToolTokens,
    tool_call_grammar,
    tools_system_prompt,
)

logger = logging.getLogger("ray.serve")

API_KEY_ENV = "RAYMOE_API_KEY"  # comma-separated keys, read by the ingress replica at start
_REQUEST_SCHEMAS = request_schemas()


class _API(FastAPI):
    """The app, whose /openapi.json describes the request bodies (the routes read them themselves)."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            schema = super().openapi()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(_REQUEST_SCHEMAS["components"])
        return self.openapi_schema  # type: ignore[return-value]


def _request_body(route: str) -> dict[str, Any]:
    ref = _REQUEST_SCHEMAS["refs"][route]
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": ref}}}}}


api = _API(title="raymoe", description="OpenAI-compatible API over DeepSeek-V3-style MoE models")


api.add_middleware(edge.EdgeMiddleware)


def _reason_code(status: int) -> str | None:
    return {404: "not_found", 405: "method_not_allowed"}.get(status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    err = APIError(exc.status_code, message, type=kind, code=_reason_code(exc.status_code), headers=exc.headers)
    return _error(err)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    loc = [str(x) for x in errors[0]["loc"] if x != "body"] if errors else []
    msg = "; ".join(f"{'.'.join(str(x) for x in e['loc'] if x != 'body')}: {e['msg']}" for e in errors)
    return _error(APIError(400, msg or "invalid request", param=".".join(loc) or None))


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return _error(exc)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _error(_internal())


def _internal() -> APIError:
    return APIError(500, "internal server error (logged on the server)", type="server_error", code="internal_error")


class _ClosingStream(StreamingResponse):
    """A stream that closes its body however the response ends: a client that cuts the connection
    mid-write leaves the body suspended at a `yield`, and only closing it runs the request's cleanup
    (its KV pin released, its held call cancelled) now rather than whenever it is collected."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except TaskCancelledError:  # Serve's word, from `receive`, that the client went away
            logger.debug("a stream's client went away")
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


async def _drain(gen: Any) -> None:
    """Read the end of a held call whose request already finished, so Serve counts the call done."""
    try:
        async for _ in gen:
            pass
    except (QueueFullError, RequestRejected, UnitUnavailable, RayError) as exc:
        # the unit's own request errors, or its replica going away: the client already has its answer
        logger.debug("a finished request's held call ended with %r", exc)
    except Exception:
        logger.warning("a finished request's held call failed", exc_info=True)


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@dataclass(slots=True)
class _Progress:
    """What one response has sent so far, for its usage, finish reason and metrics."""

    t_last: float  # when the latest tokens arrived
    tokens: int = 0
    reason: str | None = None  # OpenAI finish reason, once finished
    status: str = "ok"  # the metrics' status label: ok, an HTTP status, cancelled


@dataclass(slots=True)
class _Sample:
    """One choice to generate: its index in the response, which sample of its prompt, the prompt, its parameters."""

    index: int
    sample: int
    prompt: list[int]
    params: SamplingParams
    echo: str | None = None  # the prompt's text, with echo


@dataclass(slots=True)
class _Choice:
    """One choice of a response being generated: its engine request's events and progress."""

    index: int
    sample: int
    prompt: list[int]
    params: SamplingParams
    events: AsyncIterator[TokenChunk]
    first: TokenChunk | None = None
    t_first: float = 0.0
    state: _Progress = field(default_factory=lambda: _Progress(t_last=0.0))
    echo: str | None = None  # the prompt's text, with echo

    async def begin(self) -> None:
        """Wait for the first chunk (the prompt prefilled, the first token out)."""
        self.first = await self.events.__anext__()  # type: ignore[attr-defined]
        self.t_first = self.state.t_last = time.perf_counter()


@serve.ingress(api)
class OpenAIIngress:
    def __init__(
        self,
        config: dict[str, Any],
        prefill: DeploymentHandle | None = None,
        decode: DeploymentHandle | None = None,
        llm: DeploymentHandle | None = None,
    ) -> None:
        from raymoe.model.config import ModelConfig
        from raymoe.model.tokenizer import Tokenizer
        from raymoe.serve.metrics import IngressMetrics

        self.config = ServeConfig.model_validate(config)
        path = Path(self.config.model.resolved_path())
        self.model_config = ModelConfig.from_checkpoint(path)
        self.tokenizer = Tokenizer.from_checkpoint(path)
        self.tool_tokens = ToolTokens.of(self.tokenizer) if self.tokenizer is not None else None
        self.model_name = self.config.model.served_name()
        # what the units' engines admit: the same one default
        self.max_model_len = resolve_max_model_len(self.config.engine_config(self.config.decode), self.model_config)
        self.prefill = prefill
        # the unit that streams tokens back: decode (disaggregated) or the one unit doing both
        units = decode if decode is not None else llm
        assert units is not None, "an ingress needs a decode or an llm deployment"
        self.units = units.options(stream=True)
        self.disaggregated = prefill is not None
        # one output stream per unit replica for all of this ingress's requests there (see _pump)
        self.subscriber = f"{_replica_id()}-{uuid.uuid4().hex[:8]}"
        self._requests: dict[str, asyncio.Queue[Any]] = {}  # request id -> its deltas (or an error)
        self._replica_of: dict[str, str] = {}  # request id -> the unit replica generating it
        self._pumps: dict[str, asyncio.Task[None]] = {}  # unit replica -> its output stream's reader
        self._background: set[asyncio.Task[None]] = set()
        self.retry_after = str(self.config.ingress.retry_after_s)
        self.metrics = IngressMetrics(self.model_name)
        ing = self.config.ingress
        keys = [*ing.api_keys, *(k.strip() for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip())]
        # through the module: this class reaches the replica pickled by value, with copies of its globals
        edge.LIMITS.api_keys = [k.encode() for k in keys]
        edge.LIMITS.max_request_bytes = ing.max_request_bytes
        self.max_json_depth = ing.max_json_depth
        # parsing, templating and tokenizing: off the event loop, a few at a time
        self._prep = ThreadPoolExecutor(ing.tokenizer_threads, thread_name_prefix="raymoe-ingress-prep")
        # no tokenizer needed: a token spans at most this many characters (the longest token's
        # bytes, x4 for what a normalizer may fold), so a longer text cannot fit max_model_len
        longest = 1
        if self.tokenizer is not None:
            longest = max(len(self.tokenizer.id_to_token(i) or "") for i in range(self.tokenizer.vocab_size))
        self.max_prompt_chars = self.max_model_len * max(1, longest) * 4

    # --- validation ----------------------------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(
                400,
                f"model {model!r} is not served here (available: {self.model_name!r})",
                param="model",
                code="model_not_found",
            )

    def _token_ids(self, prompt: str | list[int], param: str, truncate: int | None = None) -> list[int]:
        """The prompt's token ids, checked; `truncate` (vLLM's truncate_prompt_tokens): only the last that many."""
        if truncate is not None:
            if truncate >= self.max_model_len:
                raise APIError(
                    400, f"truncate_prompt_tokens={truncate} leaves no room to generate (max_model_len is "
                    f"{self.max_model_len})", param="truncate_prompt_tokens",
                )
            if isinstance(prompt, str) and self.tokenizer is not None:
                prompt = self.tokenizer.encode(prompt)  # a long text is cut after tokenizing, not refused
            prompt = prompt[-truncate:]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param=param)
            if len(prompt) > self.max_prompt_chars:  # before tokenizing: cannot fit whatever it encodes to
                raise APIError(
                    400,
                    f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                    f"{len(prompt)} characters, more than that many tokens can hold",
                    param=param,
                    code="context_length_exceeded",
                )
            ids = self.tokenizer.encode(prompt)
        else:
            if len(prompt) >= self.max_model_len:
                raise APIError(
                    400,
                    f"this model's maximum context length is {self.max_model_len} tokens, the prompt has "
                    f"{len(prompt)} tokens (at least one must be left to generate)",
                    param=param,
                    code="context_length_exceeded",
                )
            ids = list(prompt)
            vocab = self.model_config.vocab_size
            if any(t < 0 or t >= vocab for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param=param)
        if not ids:
            raise APIError(400, "prompt is empty", param=param)
        return ids

    def _max_tokens(self, requested: int | None, default: int | None, prompt_len: int) -> int:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise APIError(
                400,
                f"this model's maximum context length is {self.max_model_len} tokens, the prompt has "
                f"{prompt_len} tokens (at least one must be left to generate)",
                param="prompt",
                code="context_length_exceeded",
            )
        if requested is None:
            return room if default is None else min(default, room)
        if prompt_len + requested > self.max_model_len:
            raise APIError(
                400,
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{prompt_len} and max_tokens asks for {requested} more",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested

    def _check_vocab(self, params: SamplingParams) -> SamplingParams:
        vocab = self.model_config.vocab_size
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise APIError(400, f"logit_bias token ids must be in [0, {vocab})", param="logit_bias")
        if params.allowed_token_ids and max(params.allowed_token_ids) >= vocab:
            raise APIError(400, f"allowed_token_ids must be in [0, {vocab})", param="allowed_token_ids")
        if params.bad_words and self.tokenizer is None:
            raise APIError(400, "bad_words need a tokenizer; this model has none", param="bad_words")
        return params

    def _token_text(self, token: int, as_id: bool = False) -> str:
        """A token's text for logprobs; `token_id:N` (vLLM's spelling) when it is not text alone (a
        piece of a UTF-8 character), so that distinct alternatives keep distinct keys, or when the
        request asks for ids (`return_tokens_as_token_ids`)."""
        if self.tokenizer is None:
            return f"<{token}>"
        if as_id:
            return f"token_id:{token}"
        text = self.tokenizer.decode([token])
        return f"token_id:{token}" if "\ufffd" in text else text

    def _token_logprobs(self, chunk: TokenChunk, as_ids: bool) -> list[TokenLogprob]:
        """The chunk's tokens for a response's logprobs (the alternatives' texts decoded one by one)."""
        lps = chunk.logprobs or []
        tops = chunk.top_logprobs or [None] * len(lps)
        text = self._token_text
        return [
            TokenLogprob(
                text(t, as_ids), lp,
                [(text(i, as_ids), v) for i, v in zip(top.token_ids, top.logprobs, strict=True)] if top else [],
            )
            for t, lp, top in zip(chunk.token_ids, lps, tops, strict=True)
        ]

    def _prompt_token_logprobs(
        self, prompt: list[int], plp: PromptLogprobs | None, top_n: int, as_ids: bool
    ) -> list[TokenLogprob]:
        """An echoed prompt's tokens for the completions logprobs: the first has no logprob (None), the
        others theirs and their `top_n` alternatives, as the engine computed them (prompt_logprobs)."""
        text = self._token_text
        out = [TokenLogprob(text(prompt[0], as_ids), None, None)]
        if plp is None:
            return out
        for i, lp in enumerate(plp.logprobs):
            top = plp.top[i] if plp.top is not None else None
            alts = [(text(t, as_ids), v) for t, v in zip(top.token_ids[:top_n], top.logprobs[:top_n], strict=True)] if top else []
            out.append(TokenLogprob(text(prompt[i + 1], as_ids), lp, alts))
        return out

    def _hold(self, params: SamplingParams) -> int:
        return max((len(s) for s in params.stop_strings), default=1) - 1

    # --- generation ----------------------------------------------------------------------------
    def _translate(self, exc: BaseException) -> APIError:
        """The client's answer to a failure; what only the server needs (replicas, classes) goes to the log.

        A full queue is 503 `overloaded`: the status OpenAI documents for "the engine is currently
        overloaded, please try again later", where its 429 means the caller's own rate limit or
        quota (a client would blame its key). Both 503s carry Retry-After, which OpenAI's clients
        honour when they retry. A failed unit is 503 `unavailable`: Serve is restarting it."""
        from ray.serve.exceptions import BackPressureError

        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, QueueFullError | BackPressureError):
            logger.info("request refused, queues full: %s", str(exc).splitlines()[-1][:300])
            return APIError(
                503,
                f"the server is overloaded: every model unit's queue is full; retry after {self.retry_after} s",
                type="overloaded",
                code="queue_full",
                headers={"Retry-After": self.retry_after},
            )
        if isinstance(exc, RequestRejected):
            msg = str(exc).splitlines()[-1]
            return APIError(400, msg.split("RequestRejected: ")[-1], code="request_rejected")
        if isinstance(exc, UnitUnavailable) or (isinstance(exc, RayError) and not isinstance(exc, RayTaskError)):
            logger.warning("request failed with its model unit: %s", exc)
            return APIError(
                503,
                "the model unit serving this request failed and is restarting; retry shortly",
                type="unavailable",
                code="unit_restarting",
                headers={"Retry-After": self.retry_after},
            )
        logger.error("request failed", exc_info=exc)
        return _internal()

    def _release(self, ticket: Any) -> None:
        """Let the prefill replica drop a handed-off KV. Sent from an empty context: Serve cancels every
        call a cancelled request made, and the release of a stream the client cut must still arrive."""
        asyncio.get_running_loop().call_soon(self._send_release, ticket, context=contextvars.Context())

    def _send_release(self, ticket: Any) -> None:
        assert self.prefill is not None
        self.prefill.release.remote(ticket.request_id, replica=ticket.source_replica)

    # --- the unit replicas' output streams ---------------------------------------------------
    def _subscribe(self, replica: str) -> None:
        task = self._pumps.get(replica)
        if task is None or task.done():
            self._pumps[replica] = asyncio.get_running_loop().create_task(self._pump(replica))

    async def _pump(self, replica: str) -> None:
        """Read one unit replica's output stream and hand each delta to its request's queue.

        The stream ending or failing means the replica is gone: its requests here fail with 503."""
        error: BaseException
        try:
            gen = self.units.stream_outputs.remote(self.subscriber, replica=replica)
            async for batch in gen:
                requests = self._requests
                for delta in batch.deltas:
                    q = requests.get(delta.request_id)
                    if q is not None:  # None: the client went away, its abort is on the way
                        q.put_nowait(delta)
            error = UnitUnavailable(f"unit replica {replica}: its output stream ended")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = UnitUnavailable(f"unit replica {replica}: {exc}")
        finally:
            if self._pumps.get(replica) is asyncio.current_task():
                del self._pumps[replica]
        for rid, rep in list(self._replica_of.items()):
            if rep == replica and rid in self._requests:
                self._requests[rid].put_nowait(error)

    async def _admitted(self, gen: Any) -> str:
        """The unit replica's id once it admitted the request (the first item of its held call)."""
        try:
            return await gen.__anext__()
        except BaseException:
            gen.cancel()
            raise

    async def _events(self, rid: str, prompt: list[int], params: SamplingParams) -> AsyncIterator[TokenChunk]:
        """The request's token chunks, from prefill then decode (or one unit); errors as APIError.

        The unit replica holds the request for as long as its call (`held`) is open; tokens come
        through that replica's output stream, demultiplexed into this request's queue."""
        q: asyncio.Queue[Any] = asyncio.Queue()
        self._requests[rid] = q
        held: Any = None
        ticket: Any = None  # the prefill replica pins the KV until this is released
        done = False
        try:
            if self.prefill is not None:
                resp = self.prefill.prefill.remote(rid, prompt, params)
                try:
                    res = await resp
                except asyncio.CancelledError:
                    resp.cancel()
                    raise
                first = TokenChunk(
                    [res.first_token_id], res.finished, res.finish_reason, res.text,
                    logprobs=[res.first_logprob] if res.first_logprob is not None else None,
                    top_logprobs=[res.first_top_logprobs] if params.top_logprobs else None,
                    prompt_logprobs=res.prompt_logprobs,
                )
                if res.finished:
                    done = True
                    yield first
                    return
                ticket = res.ticket
                held = self.units.decode.remote(rid, ticket, params, self.subscriber)
                # the decode replica's admission comes first, so a full decode queue is still a 503
                # with Retry-After rather than an error inside an already-started 200 stream; the KV
                # is fetched after it, while the first token goes out
                replica = await self._admitted(held)
                self._replica_of[rid] = replica
                self._subscribe(replica)
                yield first
            else:
                held = self.units.generate.remote(rid, prompt, params, self.subscriber)
                replica = await self._admitted(held)
                self._replica_of[rid] = replica
                self._subscribe(replica)
            while not done:
                items: list[OutputDelta | BaseException] = [await q.get()]
                while not q.empty():
                    items.append(q.get_nowait())
                if ticket is not None:  # decode has the KV (or gave up on it): the prefill replica may drop it
                    if not ticket.released_by_fetch:
                        self._release(ticket)
                    ticket = None
                ids: list[int] = []
                lps: list[float] = []
                tops: list[TopLogprobs | None] = []
                plp: PromptLogprobs | None = None
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    if item.error_kind == "unavailable":
                        raise UnitUnavailable(item.error or "the deployment unit failed")
                    if item.error_kind == "rejected":
                        raise RequestRejected(item.error or "the engine refused the request")
                    ids.extend(item.token_ids)
                    lps.extend(item.logprobs or ())
                    tops.extend(item.top_logprobs or ())
                    plp = plp or item.prompt_logprobs
                last = items[-1]
                assert not isinstance(last, BaseException)
                done = last.finished
                yield TokenChunk(ids, done, last.finish_reason, last.text, lps or None, tops or None, plp)
        except Exception as exc:
            raise self._translate(exc) from None
        finally:
            if ticket is not None:
                self._release(ticket)
            self._requests.pop(rid, None)
            self._replica_of.pop(rid, None)
            if held is not None:
                if done:  # the replica's call ends by itself: read its end so Serve counts it done
                    task = asyncio.get_running_loop().create_task(_drain(held))
                    self._background.add(task)  # the loop keeps only a weak reference to a task
                    task.add_done_callback(self._background.discard)
                else:
                    held.cancel()  # the client went away: the replica aborts the request, KV freed

    async def _start(self, choices: list[_Choice]) -> None:
        """Each choice's first chunk (its prefill done); errors before it keep their HTTP status.

        Sample 0 of every prompt first, then the other samples: those find the prompt's KV in the
        prefix cache instead of prefilling it again."""
        for wave in ([c for c in choices if c.sample == 0], [c for c in choices if c.sample > 0]):
            if len(wave) == 1:
                await wave[0].begin()
            elif wave:
                # each in an empty context, like `_release`: concurrent child calls made from tasks that
                # share the HTTP request's Serve context were seen to never reach their replica (only
                # the first did). The choices' own cleanup cancels their calls, as for one choice.
                loop = asyncio.get_running_loop()
                tasks = [loop.create_task(c.begin(), context=contextvars.Context()) for c in wave]
                try:
                    await asyncio.gather(*tasks)
                except BaseException:
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    raise

    async def _run(self, endpoint: str, rid: str, samples: list[_Sample], req: Any, chat: bool) -> Response:
        stream, want_ids = req.stream, req.return_token_ids
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        t0 = time.perf_counter()
        choices = [
            _Choice(s.index, s.sample, s.prompt, s.params, self._events(f"{rid}-{s.index}" if len(samples) > 1 else rid,
                                                                          s.prompt, s.params), echo=s.echo)
            for s in samples
        ]
        prompt_tokens = sum(len(c.prompt) for c in choices if c.sample == 0)

        def usage_now() -> dict[str, int]:
            return usage(prompt_tokens, sum(c.state.tokens for c in choices))

        def record(status: str | None = None) -> None:
            for c in choices:
                n = c.state.tokens
                ttft = c.t_first - t0 if c.first is not None else None
                tpot = (c.state.t_last - c.t_first) / (n - 1) if n > 1 else None
                self.metrics.finished(
                    endpoint, status or c.state.status, len(c.prompt), n, ttft, tpot, time.perf_counter() - t0
                )

        async def close() -> None:
            for c in choices:
                await c.events.aclose()

        try:
            await self._start(choices)
        except APIError as e:
            await close()
            record(str(e.status))
            return _error(e)
        except BaseException:
            await close()
            record("cancelled")
            raise
        created = int(time.time())
        as_ids = req.return_tokens_as_token_ids
        # a prompt's samples share sample 0's prompt logprobs (only it computes them: the others hit the prefix cache)
        first_of = {c.index: c.first for c in choices if c.sample == 0}

        def prompt_lps(c: _Choice) -> PromptLogprobs | None:
            first = first_of[c.index - c.sample]
            return first.prompt_logprobs if first is not None else None

        async def chunks(c: _Choice) -> AsyncIterator[tuple[str, TokenChunk, list[TokenLogprob]]]:
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, self._hold(c.params), c.params.skip_special_tokens)
            chunk: TokenChunk | None = c.first
            echo = c.echo
            while chunk is not None:
                c.state.tokens += len(chunk.token_ids)
                c.state.t_last = time.perf_counter()
                if detok is None:
                    text = "".join(f"<{t}>" for t in chunk.token_ids)
                elif chunk.finished:
                    text = detok.push(chunk.token_ids) if chunk.text is None else ""
                    text += detok.finish(chunk.text)
                else:
                    text = detok.push(chunk.token_ids)
                if chunk.finished:
                    c.state.reason = openai_finish_reason(chunk.finish_reason)
                lps = self._token_logprobs(chunk, as_ids) if c.params.logprobs else []
                if echo is not None:  # the first chunk starts with the prompt (vLLM's echo; max_tokens 0: only it)
                    echoed = []
                    if c.params.logprobs and not chat:  # chat's echoed message has no logprobs (vLLM's)
                        echoed = self._prompt_token_logprobs(c.prompt, prompt_lps(c), c.params.top_logprobs, as_ids)
                    text, lps = (echo, echoed) if req.max_tokens == 0 else (echo + text, echoed + lps)
                    echo = None
                yield text, chunk, lps
                if chunk.finished:
                    return
                chunk = await c.events.__anext__()

        def fail(status: str) -> None:
            for c in choices:
                c.state.status = status

        async def settle(tasks: list[asyncio.Future[Any]]) -> None:
            """The response is over (answered, failed or cancelled): stop its choices' tasks, close, record."""
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await close()
            record()

        if not stream:

            async def collect(c: _Choice) -> dict[str, Any]:
                parts: list[str] = []
                ids: list[int] = []
                token_lps: list[TokenLogprob] = []
                tools = self._tool_stream(req) if chat else None
                calls: list[dict[str, Any]] = []
                async for text, chunk, lps in chunks(c):
                    if tools is not None:
                        text, found = tools.push(chunk.token_ids, text)
                        calls += [call.body() for call in found]
                    parts.append(text)
                    ids.extend(chunk.token_ids)
                    token_lps.extend(lps)
                logprobs = None
                if c.params.logprobs:
                    logprobs = chat_logprobs(token_lps) if chat else completion_logprobs(token_lps, 0)
                if tools is not None:
                    rest, found = tools.finish()
                    parts.append(rest)
                    calls += [call.body() for call in found]
                    if calls and c.state.reason == "stop":
                        c.state.reason = "tool_calls"
                if chat:
                    out = chat_choice(c.index, "".join(parts), c.state.reason, logprobs, calls)
                else:
                    out = completion_choice(c.index, "".join(parts), c.state.reason, logprobs)
                if not chat and req.num_prompt_logprobs() is not None:  # vLLM's: per choice on completions
                    out["prompt_logprobs"] = self._prompt_logprobs_body(c, prompt_lps(c))
                if want_ids:
                    out["token_ids"] = ids
                    if not chat and len(samples) > req.n:  # a batch: each choice names its prompt
                        out["prompt_token_ids"] = c.prompt
                return out

            tasks = [asyncio.ensure_future(collect(c)) for c in choices]
            try:
                bodies = await asyncio.gather(*tasks)
            except APIError as e:
                fail(str(e.status))
                return _error(e)
            except BaseException:
                fail("cancelled")
                raise
            finally:
                await settle(tasks)
            out = response_body(rid, self.model_name, chat, bodies, usage_now(), created)
            if chat and req.prompt_logprobs is not None:  # vLLM's: once for the conversation on chat
                out["prompt_logprobs"] = self._prompt_logprobs_body(choices[0], prompt_lps(choices[0]))
            if want_ids and len(samples) == req.n:
                out["prompt_token_ids"] = choices[0].prompt
            return JSONResponse(out)

        async def pump(c: _Choice, q: asyncio.Queue[str | BaseException | None]) -> None:
            """One choice's events as SSE lines into the response's queue (None: it finished)."""
            try:
                if chat:
                    q.put_nowait(sse(chat_chunk(rid, self.model_name, c.index, {"role": "assistant", "content": ""},
                                                None, created)))
                offset = 0  # text_offset of the next token
                tools = self._tool_stream(req) if chat else None
                async for text, chunk, lps in chunks(c):
                    reason = c.state.reason if chunk.finished else None
                    if tools is not None:  # content until the calls begin, then each call whole, in one delta
                        before = tools.num_calls
                        text, found = tools.push(chunk.token_ids, text)
                        if chunk.finished:
                            rest, more = tools.finish()
                            text, found = text + rest, found + more
                        if found:
                            if text:
                                q.put_nowait(sse(chat_chunk(rid, self.model_name, c.index, {"content": text}, None, created)))
                                text = ""
                            for i, call in enumerate(found, before):
                                delta = {"tool_calls": [call.body(i)]}
                                q.put_nowait(sse(chat_chunk(rid, self.model_name, c.index, delta, None, created)))
                        if reason == "stop" and tools.num_calls:
                            reason = c.state.reason = "tool_calls"
                    if not text and reason is None and not want_ids and not lps:
                        continue
                    logprobs = None
                    if lps:
                        logprobs = chat_logprobs(lps) if chat else completion_logprobs(lps, offset)
                        offset += sum(len(t.token) for t in lps)
                    if chat:
                        delta = {"content": text} if text else {}
                        obj = chat_chunk(rid, self.model_name, c.index, delta, reason, created, logprobs)
                    else:
                        obj = completion_chunk(rid, self.model_name, c.index, text, reason, created, logprobs)
                    if want_ids:
                        obj["choices"][0]["token_ids"] = chunk.token_ids
                    q.put_nowait(sse(obj))
                q.put_nowait(None)
            except Exception as exc:  # the body raises it: an APIError becomes the stream's error event
                q.put_nowait(exc)

        async def body() -> AsyncIterator[str]:
            q: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
            tasks = [asyncio.ensure_future(pump(c, q)) for c in choices]
            try:
                running = len(tasks)
                while running:
                    item = await q.get()
                    if item is None:
                        running -= 1
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        yield item
                if include_usage:
                    obj = "chat.completion.chunk" if chat else "text_completion"
                    yield sse(usage_chunk(rid, self.model_name, obj, usage_now(), created))
                yield SSE_DONE
            except APIError as e:
                fail(str(e.status))
                yield sse(e.body())
                yield SSE_DONE
            except BaseException:
                fail("cancelled")
                raise
            finally:
                await settle(tasks)

        return _ClosingStream(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _prompt_logprobs_body(self, c: _Choice, plp: PromptLogprobs | None) -> list[Any] | None:
        return prompt_logprobs_body(c.prompt, plp, self._token_text) if plp is not None else None

    # --- request preparation (on the `_prep` threads) ---------------------------------------------
    async def _prepared(self, fn: Callable[[bytes], Any], request: Request) -> Any:
        raw = await request.body()  # bounded by the edge
        return await asyncio.get_running_loop().run_in_executor(self._prep, fn, raw)

    def _samples(
        self, req: Any, first: int, prompt: list[int], params: SamplingParams, echo: str | None = None
    ) -> list[_Sample]:
        """The n samples of one prompt, choice indices first.. (OpenAI's: prompt i's samples are i*n..i*n+n-1).
        Only sample 0 computes the prompt's logprobs; the others reuse its prefilled KV and its logprobs."""
        self._check_vocab(params)
        return [
            _Sample(
                first + j, j, prompt,
                params if j == 0 else replace(params, seed=req.sample_seed(j), prompt_logprobs=None), echo,
            )
            for j in range(req.n)
        ]

    def _prepare_completion(self, raw: bytes) -> tuple[CompletionRequest, list[_Sample]]:
        req: CompletionRequest = parse_request(raw, CompletionRequest, self.max_json_depth)
        self._check_model(req.model)
        samples: list[_Sample] = []
        structured = req.structured_spec()
        for i, text in enumerate(req.prompts()):
            prompt = self._token_ids(text, "prompt", req.truncate_prompt_tokens)
            # max_tokens 0 (with echo): one token is generated, as in vLLM, and only the prompt returned
            max_tokens = self._max_tokens(1 if req.max_tokens == 0 else req.max_tokens, 16, len(prompt))
            params = req.sampling_params(max_tokens, structured)
            echo = None
            if req.echo:
                untouched = isinstance(text, str) and req.truncate_prompt_tokens is None
                echo = text if untouched else self._decode(prompt, req.skip_special_tokens)
            samples += self._samples(req, i * req.n, prompt, params, echo)
        return req, samples

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if self.tokenizer is None:
            return "".join(f"<{t}>" for t in ids)
        return self.tokenizer.decode(ids, skip_special_tokens)

    def _tool_stream(self, req: ChatCompletionRequest) -> ToolCallStream | None:
        """The tool-call reader of one choice of a request whose output may call tools."""
        if not req.uses_tools() or self.tokenizer is None or self.tool_tokens is None:
            return None
        return ToolCallStream(self.tokenizer, self.tool_tokens, req.parallel_tool_calls is not False)

    def _prepare_chat(self, raw: bytes) -> tuple[ChatCompletionRequest, list[_Sample]]:
        req: ChatCompletionRequest = parse_request(raw, ChatCompletionRequest, self.max_json_depth)
        self._check_model(req.model)
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer (and no chat template)", param="messages")
        messages = [m.template_message() for m in req.messages]
        structured = req.structured_spec()
        template = None
        if req.uses_tools() or any(m["tool_calls"] or m["role"] == "tool" for m in messages):
            structured = self._tool_prompt(req, messages, structured)
            template = TOOL_CHAT_TEMPLATE
        try:
            rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, chat_template=template)
        except Exception as exc:  # a template error is about these messages
            raise APIError(400, f"messages cannot be rendered by the chat template: {exc}", param="messages") from None
        prompt = self._token_ids(rendered, "messages", req.truncate_prompt_tokens)
        requested = req.max_completion_tokens or req.max_tokens
        params = req.sampling_params(self._max_tokens(requested, None, len(prompt)), structured)
        # vLLM's chat echo: the reply starts with the last message's content when that is the assistant's
        last = req.messages[-1]
        echo = last.text() if req.echo and last.role == "assistant" and last.text() else None
        return req, self._samples(req, 0, prompt, params, echo)

    def _tool_prompt(
        self, req: ChatCompletionRequest, messages: list[dict[str, Any]], structured: StructuredOutputsParams | None
    ) -> StructuredOutputsParams | None:
        """Describe the tools in the system prompt (in place) and, for tool_choice required or a named
        function, the grammar that forces the calls (their arguments following `parameters`)."""
        if self.tool_tokens is None:
            raise APIError(400, "this model's tokenizer has no DeepSeek-V3 tool-call tokens", param="tools")
        if not req.uses_tools():
            return structured
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
        system = tools_system_prompt(tools)
        # DeepSeek-V3's template takes the last system message as the system prompt
        last = max((i for i, m in enumerate(messages) if m["role"] == "system"), default=None)
        if last is not None:
            messages[last] = {**messages[last], "content": f"{messages[last]['content']}\n\n{system}"}
        else:
            messages.insert(0, {"role": "system", "content": system, "tool_calls": None})
        forced, name = req.forced_tool()
        if not forced:
            return structured
        if structured is not None:
            raise APIError(400, "tool_choice required or named cannot be combined with response_format or guided_*",
                           param="tool_choice")
        spec = StructuredOutputsParams(
            grammar=tool_call_grammar(tools, name, req.parallel_tool_calls is not False, self.tool_tokens)
        )
        try:
            check_grammar(spec)
        except ValueError as exc:
            raise APIError(400, f"tools: a function's parameters cannot be compiled: {exc}", param="tools") from None
        return spec

    # --- routes --------------------------------------------------------------------------------
    @api.post("/v1/completions", openapi_extra=_request_body("/v1/completions"))
    async def completions(self, request: Request) -> Response:
        try:
            req, samples = await self._prepared(self._prepare_completion, request)
        except APIError as e:
            return _error(e)
        return await self._run("completions", new_id("cmpl"), samples, req, False)

    @api.post("/v1/chat/completions", openapi_extra=_request_body("/v1/chat/completions"))
    async def chat_completions(self, request: Request) -> Response:
        try:
            req, samples = await self._prepared(self._prepare_chat, request)
        except APIError as e:
            return _error(e)
        return await self._run("chat", new_id("chatcmpl"), samples, req, True)

    @api.get("/v1/models")
    async def models(self) -> Response:
        return JSONResponse(models_body(self.model_name, self.config.model.resolved_path(), self.max_model_len))

    @api.get("/health")
    async def health(self) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_name})

    # --- expert placement (raymoe.serve.experts) -------------------------------------------------
    def _unit_handles(self) -> dict[str, DeploymentHandle]:
        if self.prefill is not None:
            return {"prefill": self.prefill, "decode": self.units}
        return {"llm": self.units}

    @api.get("/v1/experts")
    async def experts(self) -> Response:
        """Each unit replica's placement version, imbalance and migrations, and each tracker's report."""
        from raymoe.serve.experts import experts_body

        app = serve.get_replica_context().app_name
        return JSONResponse(await experts_body(app, self._unit_handles()))

    @api.post("/v1/experts/rebalance")
    async def rebalance(self, request: Request) -> Response:
        """Re-plan and migrate now (optional JSON `{"role": ...}`), skipping `min_gain`; answers when done."""
        from raymoe.serve.experts import rebalance_body, rebalance_roles

        try:
            roles = rebalance_roles(await request.body(), list(self._unit_handles()))
            return JSONResponse(await rebalance_body(serve.get_replica_context().app_name, roles))
        except APIError as e:
            return _error(e)

    @api.get("/v1/stats")
    async def stats(self) -> Response:
        """Engine stats of the replicas serving this ingress (one per deployment kind answers)."""
        out: dict[str, Any] = {"model": self.model_name, "disaggregated": self.prefill is not None}
        handles = {"prefill": self.prefill, "decode" if self.disaggregated else "llm": self.units}
        for role, handle in handles.items():
            if handle is not None:
                out[role] = await handle.options(stream=False).stats.remote()
        return JSONResponse(out)
