"""The Serve application's builder: `build_app(args)` is what a Serve config names
(`import_path: raymoe.serve.app:build_app`, `args`: a `ServeConfig`).

Disaggregated: OpenAIIngress -> PrefillServer (prompt, first token, KV ticket) -> DecodeServer
(KV in, tokens streamed back). Otherwise OpenAIIngress -> LLMServer. Each deployment's Serve
options are raymoe's defaults with the config's `deployment:` over them.
"""

from __future__ import annotations

import json
from typing import Any

from ray import serve

from raymoe.serve.config import ServeConfig, UnitConfig, check_config
from raymoe.serve.ingress import OpenAIIngress
from raymoe.serve.server import DecodeServer, LLMServer, PrefillServer


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


def _options(cfg: ServeConfig, given: dict[str, Any], actor: dict[str, Any]) -> dict[str, Any]:
    """One deployment's Serve options: raymoe's (logging, runtime env, what the layout needs), then
    the config's (`deployment_options()`: the defaults with `deployment:` over them) over those."""
    ray_actor_options = {"runtime_env": _runtime_env(cfg), **actor, **given["ray_actor_options"]}
    return {**_replica_options(cfg), **given, "ray_actor_options": ray_actor_options}


def _server(cls: type, unit: UnitConfig, policy: str, cfg: ServeConfig, config: dict[str, Any]) -> Any:
    """A unit deployment, bound to `config` (the validated config as JSON, what each replica parses)."""
    from ray.serve.config import RequestRouterConfig

    from raymoe.serve.routing import EngineLoadRouter

    layout = unit.parallel
    actor = {
        # a one-GPU unit's replica holds its GPU (its engine core does, with engine_process); a
        # multi-GPU unit's workers hold theirs (parallel runtime)
        "num_gpus": 1 if unit.num_gpus == 1 and not cfg.engine_process else 0,
        # the replica runs beside its unit's workers, on the node type they ask for
        "resources": {layout.node_resource: 0.001} if layout is not None and layout.node_resource else {},
    }
    router = RequestRouterConfig(
        request_router_class=EngineLoadRouter,
        request_router_kwargs={"policy": policy},
        request_routing_stats_period_s=1.0,
        request_routing_stats_timeout_s=5.0,
    )
    options = _options(cfg, unit.deployment_options(), actor)
    return serve.deployment(cls).options(name=cls.__name__, request_router_config=router, **options).bind(config)


def ensure_tracker(app: str, role: str, deployment: str, unit: UnitConfig) -> Any | None:
    """The LoadTracker of one unit kind of `app` (`raymoe-tracker-<app>-<role>`), got or created with
    the unit's `eplb:` settings; with `eplb.enabled` false, a tracker left from an earlier deploy
    is ended and None returned.

    Called by every replica of the unit when it starts, not by `build_app`: Serve's builder does
    not know the app's name, and it may run in a short-lived build task. The tracker is detached
    (it outlives the replica that made it, so a replica restart keeps its history) and ends itself
    once the app is deleted (`serve delete`, `serve shutdown`); a redeploy under the same name
    keeps it and hands it the new settings; Ray restarts it if its process dies."""
    from raymoe.eplb.tracker import ServeUnit, start_tracker, stop_tracker

    if not unit.eplb.enabled:
        stop_tracker(app, role)
        return None
    return start_tracker(app, role, ServeUnit(app, deployment), unit.eplb.tracker_settings())


def build_app(args: dict[str, Any] | ServeConfig) -> Any:
    """The Serve application for a config (Serve's builder, named by `import_path`)."""
    cfg = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args or {})
    problems = check_config(cfg)
    if problems:
        raise ValueError("invalid raymoe serve config: " + "; ".join(problems))
    conf = json.loads(cfg.model_dump_json())
    options = _options(cfg, cfg.ingress.deployment_options(), {})
    ingress = serve.deployment(OpenAIIngress).options(name="OpenAIIngress", **options)
    if cfg.disaggregated:
        prefill = _server(PrefillServer, cfg.prefill, "least_loaded", cfg, conf)
        decode = _server(DecodeServer, cfg.decode, "kv_room", cfg, conf)
        return ingress.bind(conf, prefill, decode, None)
    return ingress.bind(conf, None, None, _server(LLMServer, cfg.decode, "kv_room", cfg, conf))
