"""Expert-parallel load balancing: placement policy, per-step replica choice, load statistics.

Pure numpy/torch, no Ray and no model: the load tracker and the parallel runtime call it.
`placement` holds the `Placement` plan, `policy` the one entry point `rebalance`, which plans from
scratch with `fresh` or migration-aware with `replan`; `replica` picks a replica per routed pair
every step; `recorder` counts the load `rebalance` reads.
"""

from raymoe.eplb.placement import Placement
from raymoe.eplb.policy import rebalance
from raymoe.eplb.recorder import ExpertLoadRecorder
from raymoe.eplb.replica import choose_replicas, gpu_token_counts

__all__ = ["ExpertLoadRecorder", "Placement", "choose_replicas", "gpu_token_counts", "rebalance"]
