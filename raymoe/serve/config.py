"""The serving app's configuration: pydantic models loaded from a Serve YAML's `args`.

A Serve config file (`serve run deployments/<name>.yaml`) names the builder in `import_path`
and passes `args`; `ServeConfig.model_validate(args)` is the one place where they are checked.
`check_config(...)` then catches layouts that validate field by field but cannot be deployed
(GPUs not divisible into TP groups, TP groups spanning nodes, more ranks than GPUs, expert slots
that do not divide over the expert-parallel GPUs) and says which field is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


class UnitConfig(_Strict):
    """One deployment unit (= one Serve replica): N nodes x G GPUs, attention TP groups, expert slots.

    `gpus_per_node: 0` is a CPU unit (the single-process engine). `attention_dp` and
    `expert_parallel` are derived (GPUs / TP and all GPUs); giving them documents the layout and
    check_config verifies them.
    """

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0, description="0 = CPU")
    attention_tp: int = Field(1, ge=1, description="tensor-parallel size of one attention group")
    attention_dp: int | None = Field(None, ge=1, description="attention groups; derived as GPUs / TP")
    expert_parallel: int | None = Field(None, ge=1, description="EP size; derived as all GPUs of the unit")
    redundant_experts: int = Field(0, ge=0, description="extra physical expert slots for hot experts")
    shared_expert_gpus: int = Field(
        0, ge=0, description="GPUs that host the shared expert (+ redundant ones) instead of routed experts"
    )
    replicas: int = Field(1, ge=1, description="deployment units of this kind")
    max_ongoing_requests: int = Field(
        1024, ge=1, description="open calls one replica holds (Serve): its requests, plus one output stream per ingress"
    )
    max_waiting_requests: int = Field(
        128, ge=1, description="requests waiting for the engine before new ones get 503 + Retry-After"
    )
    num_cpus: float = Field(0.1, ge=0, description="CPUs of the replica actor (the unit's driver)")
    node_resource: str | None = Field(None, description="custom resource pinning the replica to a node type")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads of a CPU engine; default: Ray's")
    gil_switch_interval_ms: float = Field(
        5.0, gt=0, le=100, description="sys.setswitchinterval of the replica process (CPython's default: 5 ms)"
    )
    engine: EngineSection = Field(default_factory=EngineSection)

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp_size(self) -> int:
        return max(1, self.num_gpus // self.attention_tp)

    @property
    def ep_size(self) -> int:
        return max(1, self.num_gpus)

    @property
    def is_multi_gpu(self) -> bool:
        return self.num_gpus > 1

    def problems(self, label: str, num_routed_experts: int | None) -> list[str]:
        """Why this unit cannot be laid out (empty when it can)."""
        out: list[str] = []
        g, tp = self.gpus_per_node, self.attention_tp
        if g == 0:
            if self.nodes != 1:
                out.append(f"{label}.nodes: a CPU unit (gpus_per_node: 0) runs on one node, got nodes={self.nodes}")
            if tp != 1:
                out.append(f"{label}.attention_tp: a CPU unit has no tensor parallelism, got attention_tp={tp}")
            if self.redundant_experts or self.shared_expert_gpus:
                out.append(f"{label}: redundant_experts / shared_expert_gpus need GPUs (gpus_per_node > 0)")
            return out
        if tp > g:
            out.append(
                f"{label}.attention_tp: a TP group of {tp} GPUs would span nodes of {g} GPUs "
                "(TP groups must stay inside one node)"
            )
        elif g % tp:
            out.append(f"{label}.attention_tp: gpus_per_node={g} is not divisible into TP groups of {tp}")
        if self.attention_dp is not None and self.attention_dp * tp != self.num_gpus:
            kind = "more ranks than GPUs" if self.attention_dp * tp > self.num_gpus else "GPUs left idle"
            out.append(
                f"{label}.attention_dp: {self.attention_dp} groups x TP{tp} = {self.attention_dp * tp} ranks "
                f"but the unit has {self.nodes} x {g} = {self.num_gpus} GPUs ({kind})"
            )
        if self.expert_parallel is not None and self.expert_parallel != self.num_gpus:
            kind = "more ranks than GPUs" if self.expert_parallel > self.num_gpus else "GPUs without experts"
            out.append(
                f"{label}.expert_parallel: EP{self.expert_parallel} but the unit has {self.num_gpus} GPUs ({kind})"
            )
        if self.shared_expert_gpus >= self.num_gpus:
            out.append(
                f"{label}.shared_expert_gpus: {self.shared_expert_gpus} of {self.num_gpus} GPUs leaves none for routed experts"
            )
        if num_routed_experts is not None and self.shared_expert_gpus < self.num_gpus:
            slots = num_routed_experts + self.redundant_experts
            if self.shared_expert_gpus:
                # DeepSeek's decode: one routed expert per GPU, the shared-expert GPUs also take the redundant copies
                routed_gpus = self.num_gpus - self.shared_expert_gpus
                if num_routed_experts % routed_gpus:
                    out.append(
                        f"{label}: {num_routed_experts} routed experts do not divide over the "
                        f"{routed_gpus} routed-expert GPUs ({self.num_gpus} - shared_expert_gpus {self.shared_expert_gpus})"
                    )
                if self.redundant_experts % self.shared_expert_gpus:
                    out.append(
                        f"{label}.redundant_experts: {self.redundant_experts} do not divide over "
                        f"shared_expert_gpus={self.shared_expert_gpus}"
                    )
            elif slots % self.num_gpus:
                out.append(
                    f"{label}.redundant_experts: {num_routed_experts} routed + {self.redundant_experts} redundant "
                    f"= {slots} expert slots do not divide over EP{self.num_gpus}"
                )
            if self.redundant_experts > num_routed_experts:
                out.append(
                    f"{label}.redundant_experts: {self.redundant_experts} redundant copies for "
                    f"{num_routed_experts} experts (at most one extra copy each)"
                )
        return out

    def parallel_spec(self) -> dict[str, Any] | None:
        """The unit shape handed to the engine as `EngineConfig.parallel` (None: single-process engine)."""
        if not self.is_multi_gpu:
            return None
        return {
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "attention_tp": self.attention_tp,
            "attention_dp": self.dp_size,
            "expert_parallel": self.ep_size,
            "redundant_experts": self.redundant_experts,
            "shared_expert_gpus": self.shared_expert_gpus,
            "node_resource": self.node_resource,
        }


class IngressSection(_Strict):
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.1, ge=0)
    max_ongoing_requests: int = Field(1024, ge=1)
    node_resource: str | None = None
    retry_after_s: int = Field(1, ge=1, description="Retry-After of a 503 when the queues are full")


class ServeConfig(_Strict):
    """The whole app: what is served and how prefill and decode units are shaped."""

    model: ModelSection = Field(default_factory=ModelSection)
    disaggregated: bool = Field(True, description="separate prefill and decode units; false = one unit does both")
    kv_transport: Literal["object_store"] = "object_store"
    prefill: UnitConfig = Field(default_factory=UnitConfig)
    decode: UnitConfig = Field(default_factory=UnitConfig)
    ingress: IngressSection = Field(default_factory=IngressSection)
    kv_ticket_ttl_s: float = Field(
        60.0, gt=0, description="a prefill replica drops handed-off KV that decode never confirmed after this long"
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
    single_event_loop: bool = Field(
        True,
        description="run each replica's user code and its outgoing-request router on the replica's main event "
        "loop (Serve's RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0, RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0): "
        "no cross-thread hand-off per streamed message",
    )

    def units(self) -> dict[str, UnitConfig]:
        """The unit kinds this app deploys: prefill + decode, or one `llm` unit (the decode section)."""
        return {"prefill": self.prefill, "decode": self.decode} if self.disaggregated else {"llm": self.decode}

    def engine_config(self, unit: UnitConfig) -> Any:
        """The `EngineConfig` of one unit (a replica's engine, or the benchmark's engine alone)."""
        from raymoe.engine.llm_engine import EngineConfig

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
            parallel=unit.parallel_spec(),
        )


def _checkpoint_experts(path: str) -> int | None:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        return int(json.loads(cfg.read_text()).get("n_routed_experts") or 0) or None
    except (ValueError, OSError):
        return None


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
        problems.extend(unit.problems(name, experts))
        # Serve's cap on a replica's open calls must hold everything the unit admits (each request
        # holds one call) plus, on the unit that streams tokens, one output stream per ingress
        # replica; below that, Serve queues requests the unit would have answered with a 503
        admits = unit.engine.max_num_seqs * unit.dp_size + unit.max_waiting_requests
        streams = config.ingress.num_replicas if label != "prefill" else 0
        if unit.max_ongoing_requests < admits + streams:
            extra = f" + {streams} output stream(s), one per ingress replica" if streams else ""
            problems.append(
                f"{name}.max_ongoing_requests: {unit.max_ongoing_requests} is below what the unit admits "
                f"(max_num_seqs {unit.engine.max_num_seqs} x DP{unit.dp_size} + max_waiting_requests "
                f"{unit.max_waiting_requests} = {admits}){extra}: set it to at least {admits + streams}"
            )
    return problems


def _format_validation_error(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "args"
        out.append(f"{loc}: {e['msg']}")
    return out


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
    try:
        config = ServeConfig.model_validate(args)
    except ValidationError as err:
        return _format_validation_error(err)
    return check_config(config)
