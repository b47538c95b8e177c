"""The typed configuration of one expert-parallel deployment unit (validated at the edge)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LayoutError(ValueError):
    """A unit layout that cannot be built: every problem, each `field: why`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class ParallelConfig(BaseModel):
    """One deployment unit: `nodes` x `gpus_per_node` GPU workers, attention in TP groups, experts over all GPUs.

    DeepSeek-V3 prefill: nodes=4, gpus_per_node=8, attention_tp=4, slots_per_gpu=9 (8 + 1 redundant);
    decode: nodes=40, attention_tp=4, one expert per GPU. `slots_per_gpu=None` gives each GPU an
    equal share of the routed experts plus `redundant_experts` spread over the unit.
    """

    model_config = ConfigDict(extra="forbid")

    nodes: int = Field(1, ge=1, description="nodes of the unit (one STRICT_PACK placement group each)")
    gpus_per_node: int = Field(1, ge=1, description="GPU workers per node")
    attention_tp: int = Field(1, ge=1, description="tensor-parallel size of an attention group (inside one node)")
    slots_per_gpu: int | None = Field(None, ge=1, description="physical expert slots per GPU (original + redundant)")
    redundant_experts: int = Field(0, ge=0, description="extra replica slots in the unit when slots_per_gpu is None")
    overlap: bool = Field(False, description="two-micro-batch overlap of computation with dispatch/combine")
    replica_choice: Literal["static", "balanced"] = Field(
        "balanced", description="per-step choice of a logical expert's replica: fixed per source rank, or spread"
    )
    node_limited: bool = Field(
        True, description="expert groups placed on nodes + hierarchical (node, then GPU) dispatch"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto': CUDA + NCCL when the worker sees a GPU")
    ray_address: str | None = Field(None, description="Ray cluster to join when Ray is not initialised ('auto' or an address)")
    attention_dp: int | None = Field(None, ge=1, description="derived (GPUs / TP); checked when given")
    expert_parallel: int | None = Field(None, ge=1, description="derived (all GPUs); checked when given")
    shared_expert_gpus: int = Field(
        0, ge=0,
        description="decode layout: the last N GPUs host copies of the shared expert (routed to every token) "
        "and redundant copies of hot experts instead of original routed experts (V3 decode: 64 of 320)",
    )
    node_resource: str | None = Field(None, description="custom resource every worker bundle asks a sliver of (node type)")
    load_window_steps: int = Field(1024, ge=1, description="steps of expert-load counts each worker keeps")
    migration_bytes_in_flight: int = Field(
        256 << 20, ge=1,
        description="expert-migration bytes a worker sends plus receives per transfer round (at least one expert)",
    )
    worker_cpus: float = Field(0.0, ge=0, description="CPUs each worker actor reserves (GPU workers mostly wait)")
    collective_timeout_s: float = Field(120.0, gt=0, description="a collective that waits longer fails the step")
    placement_timeout_s: float = Field(120.0, gt=0, description="how long to wait for the nodes' GPUs to be free")
    step_timeout_s: float = Field(300.0, gt=0, description="a step whose workers do not answer in time fails the unit")

    @model_validator(mode="after")
    def _check(self) -> ParallelConfig:
        problems = self.problems()
        if problems:
            raise LayoutError(problems)
        return self

    def problems(self, num_routed_experts: int | None = None) -> list[str]:
        """Why this unit cannot be laid out, one `field: why` each (empty: it can).

        The one place a unit layout is checked: the validator runs it without the model (a
        `LayoutError` carries the list), `raymoe.serve.config.check_config` with the model's
        routed-expert count for the expert-slot rules."""
        out: list[str] = []
        g, tp, world = self.gpus_per_node, self.attention_tp, self.world_size
        if tp > g:
            out.append(
                f"attention_tp: a TP group of {tp} GPUs would span nodes of {g} GPUs "
                f"(attention_tp={tp} must divide gpus_per_node={g}: an attention group never spans nodes)"
            )
        elif g % tp:
            out.append(
                f"attention_tp: gpus_per_node={g} is not divisible into TP groups of {tp} "
                f"(attention_tp={tp} must divide gpus_per_node={g})"
            )
        elif self.attention_dp is not None and self.attention_dp != self.dp_size:
            ranks = self.attention_dp * tp
            kind = "more ranks than GPUs" if ranks > world else "GPUs left idle"
            out.append(
                f"attention_dp: attention_dp={self.attention_dp} but {world} GPUs / attention_tp={tp} "
                f"= {self.dp_size} ({self.attention_dp} groups x TP{tp} = {ranks} ranks: {kind})"
            )
        if self.expert_parallel is not None and self.expert_parallel != world:
            kind = "more ranks than GPUs" if self.expert_parallel > world else "GPUs without experts"
            out.append(f"expert_parallel: expert_parallel={self.expert_parallel} but the unit has {world} GPUs ({kind})")
        if self.shared_expert_gpus >= world:
            out.append(
                f"shared_expert_gpus: {self.shared_expert_gpus} of {world} GPUs leaves none for routed experts"
            )
        elif num_routed_experts is not None:
            out.extend(self._slot_problems(num_routed_experts))
        return out

    def _slot_problems(self, experts: int) -> list[str]:
        out: list[str] = []
        world, shared, redundant = self.world_size, self.shared_expert_gpus, self.redundant_experts
        if self.slots_per_gpu is not None:
            if self.slots_per_gpu * (world - shared) < experts:
                out.append(
                    f"slots_per_gpu: {self.slots_per_gpu} x {world - shared} routed-expert GPUs cannot hold "
                    f"{experts} routed experts"
                )
            if self.slots_per_gpu > experts:
                out.append(f"slots_per_gpu: {self.slots_per_gpu} exceeds the {experts} routed experts")
            return out
        if shared:
            # DeepSeek's decode: one routed expert per GPU, the shared-expert GPUs also take the redundant copies
            if experts % (world - shared):
                out.append(
                    f"shared_expert_gpus: {experts} routed experts do not divide over the {world - shared} "
                    f"routed-expert GPUs ({world} - shared_expert_gpus {shared})"
                )
            if redundant % shared:
                out.append(f"redundant_experts: {redundant} do not divide over shared_expert_gpus={shared}")
        elif (experts + redundant) % world:
            out.append(
                f"redundant_experts: {experts} routed + {redundant} redundant = {experts + redundant} "
                f"expert slots do not divide over EP{world}"
            )
        if redundant > experts:
            out.append(
                f"redundant_experts: {redundant} redundant copies for {experts} experts (at most one extra copy each)"
            )
        return out

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp_size(self) -> int:
        return self.world_size // self.attention_tp
