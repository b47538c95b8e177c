"""The Serve application: OpenAI-compatible ingress over prefill and decode units.

`build_app(args)` is the builder a Serve config names (`import_path: raymoe.serve.app:build_app`,
`args`: a `ServeConfig`). Disaggregated: Ingress -> PrefillServer (prompt, first token, KV
ticket) -> DecodeServer (KV in, tokens streamed back). Otherwise Ingress -> LLMServer. The
ingress tokenizes, validates, detokenizes and measures what the client sees (TTFT, TPOT).

No `from __future__ import annotations` here: FastAPI reads the route signatures at run time.
"""


import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from raymoe.engine.llm_engine import DEFAULT_MAX_MODEL_LEN
from raymoe.engine.sampling_params import SamplingParams
from raymoe.serve.config import ServeConfig, UnitConfig, check_config, load_serve_yaml
from raymoe.serve.protocol import (
    SSE_DONE,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    QueueFullError,
    RequestRejected,
    UnitUnavailable,
    chat_body,
    chat_chunk,
    completion_body,
    completion_chunk,
    models_body,
    new_id,
    openai_finish_reason,
    parse_request,
    sse,
    usage,
    usage_chunk,
)
from raymoe.serve.server import (
    REJECTED,
    UNAVAILABLE,
    DecodeServer,
    LLMServer,
    OutputDelta,
    PrefillServer,
    TokenChunk,
    _replica_id,
)

api = FastAPI(title="raymoe", description="OpenAI-compatible API over DeepSeek-V3-style MoE models")


async def _drain(gen: Any) -> None:
    try:
        async for _ in gen:
            pass
    except Exception:
        pass  # the request already ended; nothing is left to report


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _Detokenizer:
    """Incremental text of one request: only complete characters, stop-string prefixes held back."""

    def __init__(self, tokenizer: Any, hold: int) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0
        self.hold = hold

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the rest
        end = max(self.sent, len(text) - self.hold)
        out, self.sent = text[self.sent : end], end
        return out

    def finish(self, final_text: str | None) -> str:
        text = final_text if final_text is not None else self.tokenizer.decode(self.ids)
        out, self.sent = text[self.sent :], len(text)
        return out


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
        self.model_name = self.config.model.served_name()
        self.max_model_len = self.config.model.max_model_len or min(
            self.model_config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN
        )
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

    # --- validation ----------------------------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(
                400,
                f"model {model!r} is not served here (available: {self.model_name!r})",
                param="model",
                code="model_not_found",
            )

    def _token_ids(self, prompt: str | list[int], param: str) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param=param)
            ids = self.tokenizer.encode(prompt)
        else:
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

    def _hold(self, params: SamplingParams) -> int:
        return max((len(s) for s in params.stop_strings), default=1) - 1

    # --- generation ----------------------------------------------------------------------------
    def _translate(self, exc: BaseException) -> APIError | None:
        from ray.serve.exceptions import BackPressureError

        if isinstance(exc, QueueFullError | BackPressureError):
            return APIError(
                503,
                f"the server is at capacity, retry later ({str(exc).splitlines()[-1][:300]})",
                type="server_overloaded",
                code="queue_full",
                headers={"Retry-After": self.retry_after},
            )
        if isinstance(exc, RequestRejected):
            msg = str(exc).splitlines()[-1]
            return APIError(400, msg.split("RequestRejected: ")[-1], code="request_rejected")
        return None

    def _release(self, ticket: Any) -> None:
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
            async for deltas in gen:
                requests = self._requests
                for delta in deltas:
                    q = requests.get(delta[0])
                    if q is not None:  # None: the client went away, its abort is on the way
                        q.put_nowait(delta)
            error = UnitUnavailable(f"unit replica {replica}: its output stream ended")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc if isinstance(exc, QueueFullError) else UnitUnavailable(f"unit replica {replica}: {exc}")
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
                first = TokenChunk([res.first_token_id], res.finished, res.finish_reason, res.text)
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
                    self._release(ticket)
                    ticket = None
                ids: list[int] = []
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    if item[3] == UNAVAILABLE:
                        raise UnitUnavailable(item[4] or "the deployment unit failed")
                    if item[3] == REJECTED:
                        raise RequestRejected(item[4] or "the engine refused the request")
                    ids.extend(item[1])
                last = items[-1]
                assert not isinstance(last, BaseException)
                done = last[2]
                yield TokenChunk(ids, done, last[3], last[4])
        except Exception as exc:
            err = self._translate(exc)
            if err is None:
                raise
            raise err from None
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

    async def _run(
        self,
        endpoint: str,
        rid: str,
        prompt: list[int],
        params: SamplingParams,
        req: Any,
        chat: bool,
    ) -> Response:
        stream, want_ids = req.stream, req.return_token_ids
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        t0 = time.perf_counter()
        events = self._events(rid, prompt, params)
        try:
            first = await events.__anext__()  # errors before the first token keep their HTTP status
        except APIError as e:
            await events.aclose()
            self.metrics.finished(endpoint, str(e.status), len(prompt), 0, None, None, time.perf_counter() - t0)
            return _error(e)
        t_first = time.perf_counter()
        created = int(time.time())
        detok = _Detokenizer(self.tokenizer, self._hold(params)) if self.tokenizer is not None else None
        state = {"n": 0, "t_last": t_first, "reason": None, "status": "ok"}

        def record() -> None:
            n = state["n"]
            tpot = (state["t_last"] - t_first) / (n - 1) if n > 1 else None
            self.metrics.finished(
                endpoint, state["status"], len(prompt), n, t_first - t0, tpot, time.perf_counter() - t0
            )

        async def chunks() -> AsyncIterator[tuple[str, TokenChunk]]:
            chunk: TokenChunk | None = first
            while chunk is not None:
                state["n"] += len(chunk.token_ids)
                state["t_last"] = time.perf_counter()
                if detok is None:
                    text = "".join(f"<{t}>" for t in chunk.token_ids)
                elif chunk.finished:
                    text = detok.push(chunk.token_ids) if chunk.text is None else ""
                    text += detok.finish(chunk.text)
                else:
                    text = detok.push(chunk.token_ids)
                if chunk.finished:
                    state["reason"] = openai_finish_reason(chunk.finish_reason)
                yield text, chunk
                if chunk.finished:
                    return
                chunk = await events.__anext__()

        if not stream:
            parts: list[str] = []
            ids: list[int] = []
            try:
                async for text, chunk in chunks():
                    parts.append(text)
                    ids.extend(chunk.token_ids)
            except APIError as e:
                state["status"] = str(e.status)
                return _error(e)
            except BaseException:
                state["status"] = "cancelled"
                raise
            finally:
                await events.aclose()
                record()
            use = usage(len(prompt), state["n"])
            build = chat_body if chat else completion_body
            out = build(rid, self.model_name, "".join(parts), state["reason"], use, created)
            if want_ids:
                out["choices"][0]["token_ids"] = ids
                out["prompt_token_ids"] = prompt
            return JSONResponse(out)

        async def body() -> AsyncIterator[str]:
            try:
                if chat:
                    yield sse(chat_chunk(rid, self.model_name, {"role": "assistant", "content": ""}, None, created))
                async for text, chunk in chunks():
                    reason = state["reason"] if chunk.finished else None
                    if not text and reason is None and not want_ids:
                        continue
                    if chat:
                        obj = chat_chunk(rid, self.model_name, {"content": text} if text else {}, reason, created)
                    else:
                        obj = completion_chunk(rid, self.model_name, text, reason, created)
                    if want_ids:
                        obj["choices"][0]["token_ids"] = chunk.token_ids
                    yield sse(obj)
                if include_usage:
                    obj = "chat.completion.chunk" if chat else "text_completion"
                    yield sse(usage_chunk(rid, self.model_name, obj, usage(len(prompt), state["n"]), created))
                yield SSE_DONE
            except APIError as e:
                state["status"] = str(e.status)
                yield sse(e.body())
                yield SSE_DONE
            except BaseException:
                state["status"] = "cancelled"
                raise
            finally:
                await events.aclose()
                record()

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # --- routes --------------------------------------------------------------------------------
    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        try:
            req: CompletionRequest = parse_request(await request.body(), CompletionRequest)
            self._check_model(req.model)
            prompt = self._token_ids(req.single_prompt(), "prompt")
            params = req.sampling_params(self._max_tokens(req.max_tokens, 16, len(prompt)))
        except APIError as e:
            return _error(e)
        return await self._run("completions", new_id("cmpl"), prompt, params, req, False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        try:
            req: ChatCompletionRequest = parse_request(await request.body(), ChatCompletionRequest)
            self._check_model(req.model)
            if self.tokenizer is None:
                raise APIError(400, "this model has no tokenizer (and no chat template)", param="messages")
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            try:
                rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            except Exception as exc:  # a template error is about these messages
                raise APIError(400, f"messages cannot be rendered by the chat template: {exc}", param="messages") from None
            prompt = self._token_ids(rendered, "messages")
            requested = req.max_completion_tokens or req.max_tokens
            params = req.sampling_params(self._max_tokens(requested, None, len(prompt)))
        except APIError as e:
            return _error(e)
        return await self._run("chat", new_id("chatcmpl"), prompt, params, req, True)

    @api.get("/v1/models")
    async def models(self) -> Response:
        return JSONResponse(models_body(self.model_name, self.max_model_len))

    @api.get("/health")
    async def health(self) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_name})

    @api.get("/v1/stats")
    async def stats(self) -> Response:
        """Engine stats of the replicas serving this ingress (one per deployment kind answers)."""
        out: dict[str, Any] = {"model": self.model_name, "disaggregated": self.prefill is not None}
        handles = {"prefill": self.prefill, "decode" if self.disaggregated else "llm": self.units}
        for role, handle in handles.items():
            if handle is not None:
                out[role] = await handle.options(stream=False).stats.remote()
        return JSONResponse(out)


def _replica_options(cfg: ServeConfig) -> dict[str, Any]:
    """Options every deployment shares: hot-path logging and the replica's event-loop layout."""
    opts: dict[str, Any] = {
        "logging_config": {"log_level": cfg.log_level, "enable_access_log": cfg.access_log},
    }
    return opts


def _runtime_env(cfg: ServeConfig) -> dict[str, Any]:
    if not cfg.single_event_loop:
        return {}
    # read by Serve when the replica process imports it: set before the actor's worker starts
    return {
        "env_vars": {
            "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
            "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
        }
    }


def _server(cls: type, unit: UnitConfig, policy: str, config: dict[str, Any]) -> Any:
    from ray.serve.config import RequestRouterConfig

    from raymoe.serve.routing import EngineLoadRouter

    cfg = ServeConfig.model_validate(config)
    resources = {unit.node_resource: 0.001} if unit.node_resource else {}
    return (
        serve.deployment(cls)
        .options(
            name=cls.__name__,
            num_replicas=unit.replicas,
            max_ongoing_requests=unit.max_ongoing_requests,
            ray_actor_options={
                "num_cpus": unit.num_cpus,
                # a one-GPU unit holds its GPU; a multi-GPU unit's workers hold theirs (parallel runtime)
                "num_gpus": 1 if unit.num_gpus == 1 else 0,
                "resources": resources,
                "runtime_env": _runtime_env(cfg),
            },
            **_replica_options(cfg),
            request_router_config=RequestRouterConfig(
                request_router_class=EngineLoadRouter,
                request_router_kwargs={"policy": policy},
                request_routing_stats_period_s=1.0,
                request_routing_stats_timeout_s=5.0,
            ),
            health_check_period_s=10.0,
            graceful_shutdown_timeout_s=5.0,
        )
        .bind(config)
    )


def build_app(args: dict[str, Any] | ServeConfig) -> Any:
    """The Serve application for a config (Serve's builder, named by `import_path`)."""
    cfg = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args or {})
    problems = check_config(cfg)
    if problems:
        raise ValueError("invalid raymoe serve config: " + "; ".join(problems))
    conf = json.loads(cfg.model_dump_json())
    ing = cfg.ingress
    ingress = serve.deployment(OpenAIIngress).options(
        name="OpenAIIngress",
        num_replicas=ing.num_replicas,
        max_ongoing_requests=ing.max_ongoing_requests,
        ray_actor_options={
            "num_cpus": ing.num_cpus,
            "resources": {ing.node_resource: 0.001} if ing.node_resource else {},
            "runtime_env": _runtime_env(cfg),
        },
        **_replica_options(cfg),
    )
    if cfg.disaggregated:
        prefill = _server(PrefillServer, cfg.prefill, "least_loaded", conf)
        decode = _server(DecodeServer, cfg.decode, "kv_room", conf)
        return ingress.bind(conf, prefill, decode, None)
    return ingress.bind(conf, None, None, _server(LLMServer, cfg.decode, "kv_room", conf))


# Serve's direct ingress (Ray >= 2.50): each ingress replica answers HTTP on its own port, so a
# request skips the proxy hop (one Ray streaming message per SSE event fewer). Serve reads the flag
# when its processes start: set before `ray.init` starts Ray here, or before `ray start` on a
# cluster (cluster.yaml). The proxy keeps serving the configured port (every route) beside it.
DIRECT_INGRESS_ENV = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}


def enable_direct_ingress() -> None:
    """Turn direct ingress on for a Ray instance this process is about to start."""
    os.environ.update(DIRECT_INGRESS_ENV)


def direct_ingress_urls(app_name: str, host: str | None = None) -> list[str]:
    """Base URLs of the app's ingress replicas' own HTTP servers (empty without direct ingress)."""
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    groups = ray.get(client._controller.get_target_groups.remote(app_name))
    urls = []
    for group in groups:
        if str(group.protocol.value) != "HTTP" or group.app_name != app_name:
            continue
        prefix = group.route_prefix.rstrip("/")
        for t in group.targets:
            if t.name.startswith("SERVE_REPLICA::"):  # a replica, not a proxy (the fallback target)
                urls.append(f"http://{host or t.ip}:{t.port}{prefix}")
    return urls


def run_from_yaml(
    path: str | Path, *, blocking: bool = True, http_port: int | None = None, direct_ingress: bool = True
) -> Any:
    """Start Ray (or join RAY_ADDRESS), Serve with the file's HTTP options, and the app."""
    import ray

    app_entry, args = load_serve_yaml(path)
    from raymoe.serve.config import load_config_file

    cfg = load_config_file(path)
    problems = check_config(cfg)
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    import yaml

    doc = yaml.safe_load(Path(path).read_text())
    http = dict(doc.get("http_options") or {})
    if http_port is not None:
        http["port"] = http_port
    owns_ray = False
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or "local"
        owns_ray = address == "local"
        if direct_ingress and owns_ray:
            enable_direct_ingress()
        ray.init(address=address)
    serve.start(http_options=http, proxy_location=doc.get("proxy_location", "HeadOnly"))
    host, port = http.get("host", "127.0.0.1"), http.get("port", 8000)
    name = app_entry.get("name", "raymoe")
    prefix = app_entry.get("route_prefix", "/")
    print(f"raymoe: starting {cfg.model.served_name()} ({'disaggregated' if cfg.disaggregated else 'unified'})", flush=True)
    handle = serve.run(build_app(cfg), name=name, route_prefix=prefix, blocking=False)
    print(f"raymoe: serving {cfg.model.served_name()} at http://{host}:{port}{prefix.rstrip('/')}/v1", flush=True)
    loopback = host if host in ("127.0.0.1", "localhost") else None
    for url in direct_ingress_urls(name, loopback):
        print(f"raymoe: direct ingress (no proxy hop) at {url}/v1", flush=True)
    if not blocking:
        return handle
    try:
        while True:
            time.sleep(10)
    except KeyboardInterrupt:
        print("raymoe: shutting down", flush=True)
        if owns_ray:  # a Ray instance of our own: stop it at once (Serve would drain ingress replicas ~35 s)
            ray.shutdown()
        else:
            serve.shutdown()
    return handle
