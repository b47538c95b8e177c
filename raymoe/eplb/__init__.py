"""Expert-parallel load balancing: placement policy, per-step replica choice, load statistics.

Pure numpy/torch, no Ray and no model: the load tracker and the parallel runtime call it.
"""

from raymoe.eplb.policy import Placement, rebalance

__all__ = ["Placement", "rebalance"]
