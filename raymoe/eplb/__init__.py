"""Expert-parallel load balancing: placement policy, per-step replica choice, load statistics.

Pure numpy/torch, no Ray and no model: the load tracker and the parallel runtime call it.
"""

from raymoe.eplb.policy import Placement, rebalance
from raymoe.eplb.recorder import ExpertLoadRecorder
from raymoe.eplb.replica import choose_replicas, gpu_token_counts

__all__ = ["ExpertLoadRecorder", "Placement", "choose_replicas", "gpu_token_counts", "rebalance"]
