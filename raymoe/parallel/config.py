"""The typed configuration of one expert-parallel deployment unit (validated at the edge)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
    worker_cpus: float = Field(0.0, ge=0, description="CPUs each worker actor reserves (GPU workers mostly wait)")
    collective_timeout_s: float = Field(120.0, gt=0, description="a collective that waits longer fails the step")
    placement_timeout_s: float = Field(120.0, gt=0, description="how long to wait for the nodes' GPUs to be free")
    step_timeout_s: float = Field(300.0, gt=0, description="a step whose workers do not answer in time fails the unit")

    @model_validator(mode="after")
    def _check(self) -> ParallelConfig:
        if self.gpus_per_node % self.attention_tp:
            raise ValueError(
                f"attention_tp={self.attention_tp} must divide gpus_per_node={self.gpus_per_node} "
                "(an attention group never spans nodes)"
            )
        if self.attention_dp is not None and self.attention_dp != self.dp_size:
            raise ValueError(
                f"attention_dp={self.attention_dp} but {self.world_size} GPUs / attention_tp={self.attention_tp} "
                f"= {self.dp_size}"
            )
        if self.expert_parallel is not None and self.expert_parallel != self.world_size:
            raise ValueError(f"expert_parallel={self.expert_parallel} but the unit has {self.world_size} GPUs")
        if self.shared_expert_gpus >= self.world_size:
            raise ValueError(
                f"shared_expert_gpus={self.shared_expert_gpus} leaves no GPU for the routed experts "
                f"({self.world_size} GPUs in the unit)"
            )
        return self

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp_size(self) -> int:
        return self.world_size // self.attention_tp
