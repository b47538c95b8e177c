"""The serving app's configuration: pydantic models loaded from a Serve YAML's `args`.

A Serve config file (`serve run deployments/<name>.yaml`) names the builder in `import_path`
and passes `args`; `ServeConfig.model_validate(args)` checks them field by field, a unit's
layout with `ParallelConfig`'s own validator (TP groups that would span nodes or do not divide
a node's GPUs, more ranks than GPUs) and its Serve options with Serve's own schema.
`check_config(...)` then adds what needs the model or several sections (expert slots that do not
divide over the expert-parallel GPUs, Serve's cap below what a unit admits). Every message names
the field (`prefill.parallel.attention_tp: ...`); `check_args(args)` gives both in one list.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raymoe.parallel.config import LayoutError, ParallelConfig

if TYPE_CHECKING:
    from raymoe.engine.config import EngineConfig
    from raymoe.eplb.tracker import TrackerSettings

BUILDER_IMPORT_PATH = "raymoe.serve.app:build_app"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSection(_Strict):
    """What is served. `path: null` is the embedded tiny model, generated on first use."""

    path: str | None = Field(None, description="checkpoint directory (HF DeepSeek-V3 layout); null = tiny default")
    name: str | None = Field(None, description="model id in the OpenAI API; default: the directory name")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="'auto', 'cpu', 'cuda'")
    max_model_len: int | None = Field(None, ge=2, description="prompt + output tokens; default min(config, 8192)")
    num_routed_experts: int | None = Field(
        None, ge=1, description="expected routed experts; checked against the checkpoint when it is present"
    )

    def resolved_path(self) -> str:
        if self.path is not None:
            return self.path
        from raymoe.model.tiny import default_checkpoint

        return str(default_checkpoint())

    def served_name(self) -> str:
        if self.name:
            return self.name
        return Path(self.path).name if self.path else "tiny-deepseek-v3"


class EngineSection(_Strict):
    """Per-engine knobs passed to `EngineConfig` (cache size is per DP rank)."""

    kv_cache_tokens: int | None = Field(None, ge=1)
    block_size: int = Field(16, ge=1, le=1024)
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)


# Serve's deployment options raymoe sets unless a unit's or the ingress's `deployment:` overrides
# them (`ray_actor_options` key by key): names and values as in `serve.deployment(...).options`
UNIT_DEPLOYMENT_DEFAULTS: dict[str, Any] = {
    "num_replicas": 1,
    "max_ongoing_requests": 1024,  # open calls one replica holds: its requests, plus one output stream per ingress
    "health_check_period_s": 10.0,
    "graceful_shutdown_timeout_s": 5.0,
    "ray_actor_options": {"num_cpus": 0.1},  # the replica actor (the unit's driver)
}
INGRESS_DEPLOYMENT_DEFAULTS: dict[str, Any] = {
    "num_replicas": 1,
    "max_ongoing_requests": 1024,
    "ray_actor_options": {"num_cpus": 0.1},
}
# set by raymoe and needed for correctness: calls with `replica=` must reach that replica
UNIT_OWNED_OPTIONS = frozenset({"name", "request_router_config"})
INGRESS_OWNED_OPTIONS = frozenset({"name"})


class OptionsError(ValueError):
    """Serve deployment options Serve would refuse: every problem, each `option: why`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _check_deployment(value: dict[str, Any], owned: frozenset[str]) -> dict[str, Any]:
    """Serve deployment options, checked against Serve's own names and types (`ray.serve.schema`)."""
    from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema

    names = set(DeploymentSchema.model_fields) - owned
    problems = [f"{k}: not a Serve deployment option raymoe leaves open ({', '.join(sorted(names))})"
                for k in sorted(set(value) - names)]
    actor = value.get("ray_actor_options") or {}
    problems += [f"ray_actor_options.{k}: not a Ray actor option" for k in sorted(set(actor) - set(RayActorOptionsSchema.model_fields))]
    if isinstance(value.get("num_replicas"), str):
        problems.append("num_replicas: give a count (or autoscaling_config with max_replicas)")
    if not problems:
        try:
            DeploymentSchema.model_validate({"name": "raymoe", **value})
        except ValidationError as err:
            problems = _format_validation_error(err, root="")  # ": why" for the options as a whole
    if problems:
        raise OptionsError(problems)
    return value


def _merge_options(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    out = {**defaults, **given}
    if given.get("autoscaling_config") and "num_replicas" not in given:
        del out["num_replicas"]  # Serve refuses a fixed replica count beside autoscaling
    out["ray_actor_options"] = {**defaults.get("ray_actor_options", {}), **(given.get("ray_actor_options") or {})}
    return out


def _max_replicas(options: dict[str, Any]) -> int:
    auto = options.get("autoscaling_config")
    if auto:
        return int(auto.get("max_replicas", 1))
    return int(options["num_replicas"])


class EplbSection(_Strict):
    """The unit kind's LoadTracker (`raymoe.eplb.tracker`): re-plan expert placement from live load.

    Off by default (as in vLLM and SGLang). On a CPU unit the tracker only measures: the single
    process hosts every expert, so it reports the imbalance an expert-parallel unit would have."""

    enabled: bool = Field(False, description="run a LoadTracker for this unit kind")
    interval_s: float = Field(600.0, gt=0, description="re-plan at least this often (DeepSeek-V3: every 10 minutes)")
    poll_s: float = Field(10.0, gt=0, description="how often the tracker reads every replica's expert load")
    trigger_imbalance: float | None = Field(
        None, ge=1.0, description="re-plan early when the current placement's imbalance (busiest GPU / mean) "
        "exceeds this; null: on the interval only"
    )
    min_gain: float = Field(
        1.05, ge=1.0, description="migrate only when current / re-planned imbalance reaches this (skip when balanced)"
    )
    window_steps: int | None = Field(
        None, ge=1, description="engine steps of expert load each replica keeps and the plan reads; "
        "default: parallel.load_window_steps"
    )
    tolerance: float = Field(
        0.03, ge=0, lt=1, description="how much worse than a fresh plan a layer's few-move plan may be (rebalance)"
    )
    max_moves: int | None = Field(
        None, ge=1, description="most expert copies one migration moves (whole layers, largest gain first); null: no cap"
    )
    migration_timeout_s: float = Field(
        300.0, gt=0, description="a replica's migration (stage + commit) that takes longer is reported as failed"
    )

    def tracker_settings(self) -> TrackerSettings:
        from raymoe.eplb.tracker import TrackerSettings

        return TrackerSettings(**self.model_dump(exclude={"enabled", "window_steps"}))


class UnitConfig(_Strict):
    """One deployment unit kind: each Serve replica of it is one unit (its GPUs laid out by `parallel`).

    No `parallel` is a CPU unit (the single-process engine). `deployment` passes Serve deployment
    options through (merged over UNIT_DEPLOYMENT_DEFAULTS): replicas, `max_ongoing_requests`,
    `ray_actor_options`, health-check and graceful-shutdown periods, autoscaling, ...
    """

    parallel: ParallelConfig | None = Field(
        None, description="the unit's nodes x GPUs and their layout (raymoe.parallel.config.ParallelConfig); null = CPU"
    )
    deployment: dict[str, Any] = Field(
        default_factory=dict, description="Serve deployment options over UNIT_DEPLOYMENT_DEFAULTS"
    )
    max_waiting_requests: int = Field(
        128, ge=1, description="requests waiting for the engine before new ones get 503 + Retry-After"
    )
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads of a CPU engine; default: Ray's")
    gil_switch_interval_ms: float = Field(
        5.0, gt=0, le=100, description="sys.setswitchinterval of the replica process (CPython's default: 5 ms); "
        "matters with engine_process false, where the engine thread shares the replica's GIL"
    )
    engine: EngineSection = Field(default_factory=EngineSection)
    eplb: EplbSection = Field(default_factory=EplbSection)

    @field_validator("deployment")
    @classmethod
    def _deployment(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_deployment(value, UNIT_OWNED_OPTIONS)

    @property
    def num_gpus(self) -> int:
        return 0 if self.parallel is None else self.parallel.world_size

    @property
    def dp_size(self) -> int:
        return 1 if self.parallel is None else max(1, self.parallel.dp_size)

    def parallel_config(self) -> ParallelConfig | None:
        """The layout the engine runs on the expert-parallel runtime (`build_executor`'s `parallel`).

        None: the single-process engine (a CPU unit, or a one-GPU unit whose replica holds the GPU).
        `eplb.window_steps` sets the workers' load window (`load_window_steps`)."""
        if self.parallel is None or self.num_gpus <= 1:
            return None
        if self.eplb.window_steps is None:
            return self.parallel
        return self.parallel.model_copy(update={"load_window_steps": self.eplb.window_steps})

    def load_window_steps(self) -> int:
        """Engine steps of expert load a replica keeps (what the tracker's plans read)."""
        parallel = self.parallel_config()
        if parallel is None:
            from raymoe.engine.model_runner import LOAD_WINDOW_STEPS

            return LOAD_WINDOW_STEPS
        return parallel.load_window_steps

    def deployment_options(self) -> dict[str, Any]:
        """Serve's options of this unit's deployment: the defaults, with `deployment` over them."""
        return _merge_options(UNIT_DEPLOYMENT_DEFAULTS, self.deployment)

    @property
    def replicas(self) -> int:
        """The most replicas (units) Serve runs of this kind."""
        return _max_replicas(self.deployment_options())

    @property
    def max_ongoing_requests(self) -> int:
        return int(self.deployment_options()["max_ongoing_requests"])


class IngressSection(_Strict):
    """The OpenAI ingress deployment: its Serve options and its answer to a full queue."""

    deployment: dict[str, Any] = Field(
        default_factory=dict, description="Serve deployment options over INGRESS_DEPLOYMENT_DEFAULTS"
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After of a 503 when the queues are full")
    api_keys: list[str] = Field(
        default_factory=list,
        description="when any is set (here or in RAYMOE_API_KEY, comma-separated), every /v1/* route needs "
        "`Authorization: Bearer <key>`; /health stays open",
    )
    max_request_bytes: int = Field(
        8 << 20, ge=1024, description="a larger request body is answered 413 before it is parsed"
    )
    max_json_depth: int = Field(32, ge=4, le=1000, description="deeper JSON nesting in a request body is a 400")
    tokenizer_threads: int = Field(
        2, ge=1, le=64, description="threads that parse, template and tokenize requests off the event loop"
    )

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        if any(not k or k != k.strip() or "," in k for k in value):
            raise ValueError("each API key must be a non-empty string without spaces at its ends or commas")
        return value

    @field_validator("deployment")
    @classmethod
    def _deployment(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_deployment(value, INGRESS_OWNED_OPTIONS)

    def deployment_options(self) -> dict[str, Any]:
        return _merge_options(INGRESS_DEPLOYMENT_DEFAULTS, self.deployment)

    @property
    def replicas(self) -> int:
        return _max_replicas(self.deployment_options())


# glibc malloc: blocks up to 32 MiB from the heap, not mmap (its dynamic threshold starts at 128 KiB),
# and the heap's freed top kept, not trimmed: allocation-heavy torch steps stop paying page faults
ENGINE_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}


class ServeConfig(_Strict):
    """The whole app: what is served and how prefill and decode units are shaped."""

    model: ModelSection = Field(default_factory=ModelSection)
    disaggregated: bool = Field(True, description="separate prefill and decode units; false = one unit does both")
    kv_transport: Literal["object_store", "direct"] = Field(
        "object_store",
        description="how a prefilled request's KV reaches decode: object_store (ray.put on the prefill replica, "
        "fetched through Ray's object store) or direct (the prefill engine core serves it on a ZMQ socket of its "
        "own, IPC on its node and TCP across nodes, and decode pulls it; needs engine_process)",
    )
    prefill: UnitConfig = Field(default_factory=UnitConfig)
    decode: UnitConfig = Field(default_factory=UnitConfig)
    ingress: IngressSection = Field(default_factory=IngressSection)
    kv_ticket_ttl_s: float = Field(
        60.0, gt=0, description="a prefill replica drops handed-off KV that decode never confirmed after this long"
    )
    kv_fetch_timeout_s: float = Field(
        10.0, gt=0, description="how long decode waits for a prefill core to send a handoff (kv_transport: direct)"
    )
    stream_interval_ms: float = Field(
        0.0, ge=0, le=1000, description="a replica's output stream to an ingress sends at most one message per window "
        "(a request's first and last tokens at once; 0: every step)"
    )
    subscriber_ttl_s: float = Field(
        30.0, gt=0, description="a unit replica aborts the requests of an ingress whose output stream has been gone this long"
    )
    metrics_interval_s: float = Field(1.0, gt=0, description="how often replicas publish their gauges")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="Serve log level of every replica (INFO logs each request on the hot path)"
    )
    access_log: bool = Field(False, description="Serve's per-request access log line in every replica")
    engine_process: bool = Field(
        True,
        description="step each unit's engine in an engine-core process beside its replica (a Ray actor on the "
        "replica's node, ZMQ IPC between them, as vLLM's API server and engine core); false: on a thread of "
        "the replica, sharing its GIL with the event loop",
    )
    engine_env: dict[str, str] = Field(
        default_factory=lambda: dict(ENGINE_MALLOC_ENV),
        description="environment variables of each engine-core process (engine_process). The default keeps "
        "glibc's malloc from handing freed blocks of up to 32 MiB back to the kernel: a step's large temporaries "
        "(a prefill's activations) then reuse mapped pages instead of faulting in fresh ones every layer "
        "(a 16 x 128-token prefill step ~25% faster on a 2-core VM). {} for glibc's own behaviour",
    )
    single_event_loop: bool = Field(
        True,
        description="run each replica's user code and its outgoing-request router on the replica's main event "
        "loop (Serve's RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0, RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0): "
        "no cross-thread hand-off per streamed message",
    )

    @model_validator(mode="after")
    def _direct_needs_a_core_process(self) -> ServeConfig:
        if self.disaggregated and self.kv_transport == "direct" and not self.engine_process:
            raise ValueError("kv_transport: direct is served by the prefill engine-core process; set "
                             "engine_process: true or kv_transport: object_store")
        return self

    def units(self) -> dict[str, UnitConfig]:
        """The unit kinds this app deploys: prefill + decode, or one `llm` unit (the decode section)."""
        return {"prefill": self.prefill, "decode": self.decode} if self.disaggregated else {"llm": self.decode}

    def engine_config(self, unit: UnitConfig) -> EngineConfig:
        """The `EngineConfig` of one unit (a replica's engine, or the benchmark's engine alone)."""
        from raymoe.engine.config import EngineConfig

        e = unit.engine
        return EngineConfig(
            model=self.model.resolved_path(),
            dtype=self.model.dtype,
            device=self.model.device,
            max_model_len=self.model.max_model_len,
            kv_cache_tokens=e.kv_cache_tokens,
            gpu_memory_utilization=e.gpu_memory_utilization,
            block_size=e.block_size,
            max_num_seqs=e.max_num_seqs,
            max_num_batched_tokens=e.max_num_batched_tokens,
            enable_prefix_caching=e.enable_prefix_caching,
        )


def _checkpoint_experts(path: str) -> int | None:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        return int(json.loads(cfg.read_text()).get("n_routed_experts") or 0) or None
    except (ValueError, OSError):
        return None


def _eplb_problems(unit: UnitConfig) -> list[str]:
    """`field: why` of a unit's `eplb:` section that only make sense beside its other sections."""
    e, out = unit.eplb, []
    if not e.enabled:
        return out
    if e.poll_s > e.interval_s:
        out.append(f"poll_s: {e.poll_s} is longer than interval_s {e.interval_s} (the tracker re-plans from its polls)")
    if e.window_steps is not None and unit.parallel_config() is None:
        out.append("window_steps: only an expert-parallel unit's window can be set (one process keeps a fixed one)")
    p = unit.parallel
    if e.window_steps is not None and p is not None and "load_window_steps" in p.model_fields_set \
            and p.load_window_steps != e.window_steps:
        out.append(
            f"window_steps: {e.window_steps} disagrees with parallel.load_window_steps {p.load_window_steps} "
            "(one window: set one of them)"
        )
    return out


def check_config(config: ServeConfig, *, inspect_checkpoint: bool = True) -> list[str]:
    """Layout problems of a validated config, one message each naming the field (empty = deployable)."""
    problems: list[str] = []
    experts = config.model.num_routed_experts
    if inspect_checkpoint and config.model.path is not None:
        found = _checkpoint_experts(config.model.path)
        if found is not None and experts is not None and found != experts:
            problems.append(
                f"model.num_routed_experts: {experts}, but {config.model.path}/config.json has n_routed_experts={found}"
            )
        experts = found or experts
    for label, unit in config.units().items():
        name = label if config.disaggregated else "decode"
        if unit.parallel is not None:  # the rules that need the model: ParallelConfig's, with the expert count
            problems.extend(f"{name}.parallel.{p}" for p in unit.parallel.problems(experts))
        # Serve's cap on a replica's open calls must hold everything the unit admits (each request
        # holds one call) plus, on the unit that streams tokens, one output stream per ingress
        # replica; below that, Serve queues requests the unit would have answered with a 503
        problems.extend(f"{name}.eplb.{p}" for p in _eplb_problems(unit))
        admits = unit.engine.max_num_seqs * unit.dp_size + unit.max_waiting_requests
        streams = config.ingress.replicas if label != "prefill" else 0
        if unit.max_ongoing_requests < admits + streams:
            extra = f" + {streams} output stream(s), one per ingress replica" if streams else ""
            problems.append(
                f"{name}.deployment.max_ongoing_requests: {unit.max_ongoing_requests} is below what the unit admits "
                f"(max_num_seqs {unit.engine.max_num_seqs} x DP{unit.dp_size} + max_waiting_requests "
                f"{unit.max_waiting_requests} = {admits}){extra}: set it to at least {admits + streams}"
            )
    return problems


def _format_validation_error(err: ValidationError, root: str = "args") -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or root
        error = (e.get("ctx") or {}).get("error")
        if isinstance(error, LayoutError | OptionsError):  # several problems, each naming its field
            out.extend(f"{loc}{p}" if p.startswith(":") else f"{loc}.{p}" for p in error.problems)
        else:
            out.append(f"{loc}: {e['msg'].removeprefix('Value error, ')}")
    return out


def check_args(args: dict[str, Any], *, inspect_checkpoint: bool = True) -> list[str]:
    """Everything wrong with a config's `args` (field errors, else layout errors); empty = deployable."""
    try:
        config = ServeConfig.model_validate(args)
    except ValidationError as err:
        return _format_validation_error(err)
    return check_config(config, inspect_checkpoint=inspect_checkpoint)


def load_serve_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the application entry using raymoe's builder, its raw args) from a Serve config file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such deployment file")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("applications"), list) or not doc["applications"]:
        raise ValueError(f"{path}: expected a Serve config with a non-empty 'applications' list")
    for app in doc["applications"]:
        if isinstance(app, dict) and app.get("import_path") == BUILDER_IMPORT_PATH:
            args = app.get("args") or {}
            if not isinstance(args, dict):
                raise ValueError(f"{path}: applications[].args must be a mapping")
            return app, args
    raise ValueError(f"{path}: no application with import_path {BUILDER_IMPORT_PATH!r}")


def load_config_file(path: str | Path) -> ServeConfig:
    """The validated ServeConfig of a deployment file; ValueError listing every problem."""
    _, args = load_serve_yaml(path)
    try:
        config = ServeConfig.model_validate(args)
    except ValidationError as err:
        raise ValueError(f"{path}: " + "; ".join(_format_validation_error(err))) from None
    return config


def check_config_file(path: str | Path) -> list[str]:
    """Everything wrong with a deployment file (field errors, then layout errors); empty = valid."""
    try:
        _, args = load_serve_yaml(path)
    except (ValueError, FileNotFoundError) as exc:
        return [str(exc)]
    return check_args(args)
