"""Who is who in a deployment unit: global rank -> node, local GPU, attention group (DP rank), TP rank.

Ranks are laid out node-major (rank = node * gpus_per_node + local GPU); attention groups are
consecutive TP-sized runs of GPUs inside a node, so a group never spans nodes and DP rank d is
group d. Every GPU is an expert host (EP = world size) with `slots_per_gpu` physical slots.
"""

from __future__ import annotations

from dataclasses import dataclass

from raymoe.model.config import ModelConfig
from raymoe.parallel.config import LayoutError, ParallelConfig


@dataclass(frozen=True, slots=True)
class Topology:
    nodes: int
    gpus_per_node: int
    attention_tp: int
    slots_per_gpu: int
    num_experts: int
    shared_expert_gpus: int = 0  # decode layout: the last N GPUs host shared-expert and redundant copies

    @classmethod
    def from_config(cls, parallel: ParallelConfig, model: ModelConfig) -> Topology:
        n_exp = model.n_routed_experts
        problems = parallel.problems(n_exp)
        if model.num_attention_heads % parallel.attention_tp:
            problems.append(
                f"attention_tp: attention_tp={parallel.attention_tp} must divide "
                f"num_attention_heads={model.num_attention_heads}"
            )
        if problems:
            raise LayoutError(problems)
        # the checks above make these divisions exact (decode layout: one share of the routed experts per routed GPU)
        shared, world = parallel.shared_expert_gpus, parallel.world_size
        slots = parallel.slots_per_gpu or (
            n_exp // (world - shared) if shared else (n_exp + parallel.redundant_experts) // world
        )
        return cls(
            parallel.nodes, parallel.gpus_per_node, parallel.attention_tp, slots, n_exp, parallel.shared_expert_gpus
        )

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp_size(self) -> int:
        return self.world_size // self.attention_tp

    @property
    def num_slots(self) -> int:
        return self.world_size * self.slots_per_gpu

    @property
    def redundant_slots(self) -> int:
        return self.num_slots - self.num_experts

    @property
    def shared_expert_id(self) -> int | None:
        """Logical id of the shared expert when it is routed (decode layout), else None."""
        return self.num_experts if self.shared_expert_gpus else None

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def local_of(self, rank: int) -> int:
        return rank % self.gpus_per_node

    def dp_rank_of(self, rank: int) -> int:
        return rank // self.attention_tp

    def tp_rank_of(self, rank: int) -> int:
        return rank % self.attention_tp

    def attention_group(self, dp_rank: int) -> list[int]:
        return list(range(dp_rank * self.attention_tp, (dp_rank + 1) * self.attention_tp))

    def node_ranks(self, node: int) -> list[int]:
        return list(range(node * self.gpus_per_node, (node + 1) * self.gpus_per_node))

    def describe(self) -> str:
        return (
            f"{self.nodes} node(s) x {self.gpus_per_node} GPU(s): attention TP{self.attention_tp} x DP{self.dp_size}, "
            f"EP{self.world_size} with {self.slots_per_gpu} slot(s)/GPU ({self.redundant_slots} redundant)"
            + (f", shared expert routed on {self.shared_expert_gpus} GPU(s)" if self.shared_expert_gpus else "")
        )
