"""The decode layout's placement: routed experts on most GPUs, the shared expert and hot copies on the rest.

DeepSeek-V3's decode unit (40 x 8 GPUs) hosts one routed expert per GPU on 256 GPUs and gives 64
GPUs to the shared expert (treated as a routed expert every token selects: 9 experts per token)
and to redundant copies of hot experts. Here half of the shared-expert GPUs (at least one) hold a
copy of the shared expert, so each copy sees about as many tokens as a routed expert; every other
free slot holds a copy of the hottest experts not yet on that GPU. The shared expert is logical
id `num_experts` in the resulting `Placement` (the placement policy's convention).
"""

from __future__ import annotations

import numpy as np

from raymoe.eplb.placement import Placement
from raymoe.parallel.topology import Topology


def decode_placement(topo: Topology, num_layers: int, load: np.ndarray | None = None) -> Placement:
    """Plan every MoE layer for `topo.shared_expert_gpus` > 0; `load` [layers, experts] ranks the hot experts."""
    n_exp, k, world, s = topo.num_experts, topo.slots_per_gpu, topo.world_size, topo.shared_expert_gpus
    if s <= 0:
        raise ValueError("decode_placement needs shared_expert_gpus > 0")
    routed_gpus = world - s
    if load is None:
        load = np.ones((num_layers, n_exp))
    load = np.asarray(load, dtype=np.float64)
    if load.shape != (num_layers, n_exp):
        raise ValueError(f"load: expected shape {[num_layers, n_exp]}, got {list(load.shape)}")
    shared_copies = max(1, s // 2)
    phy = np.empty((num_layers, world * k), dtype=np.int64)
    for layer in range(num_layers):
        gpus: list[list[int]] = [[] for _ in range(world)]
        for e in range(n_exp):
            gpus[e % routed_gpus].append(e)
        for i in range(shared_copies):
            gpus[routed_gpus + i].append(n_exp)
        hot = np.argsort(-load[layer], kind="stable").tolist()
        nxt = 0
        for g in range(world):
            while len(gpus[g]) < k:
                for _ in range(n_exp):  # the next hot expert this GPU does not hold yet
                    e = hot[nxt % n_exp]
                    nxt += 1
                    if e not in gpus[g]:
                        break
                gpus[g].append(e)
        phy[layer] = np.array([e for g in gpus for e in g[:k]], dtype=np.int64)
    return Placement.from_phy2log(phy, n_exp + 1, topo.nodes, topo.gpus_per_node, k, mode="decode")
