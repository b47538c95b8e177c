"""Shared fixtures.

One Ray instance per test session: a simulated cluster (`ray.cluster_utils.Cluster`) with a
head node and two worker nodes that declare 4 "GPUs" each (CPU workers, gloo). Serve tests and
expert-parallel tests both run on it; it starts only when a test asks for it and is always shut
down. Its address is passed explicitly, never discovered through /tmp/ray/ray_current_cluster.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

GPUS_PER_SIM_NODE = 4
SIM_NODES = 2


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread: on a 2-core box shared with Ray workers, two threads stall 3-10x."""
    import torch

    torch.set_num_threads(1)


@dataclass(frozen=True)
class ServeHTTP:
    """The session's one Serve instance: its proxy's base URL; modules add and delete their apps."""

    base: str


@pytest.fixture(scope="session")
def serve_http(ray_cluster: RayTestCluster) -> Iterator[ServeHTTP]:
    import socket

    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield ServeHTTP(f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()


@dataclass(frozen=True)
class RayTestCluster:
    address: str
    num_nodes: int
    gpus_per_node: int


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayTestCluster]:
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Serve reads this when its processes start: the serve tests reach each app both through the
    # proxy and straight at its ingress replica (what `raymoe serve` and `raymoe bench` run)
    from raymoe.serve.runner import DIRECT_INGRESS_ENV

    for key, value in DIRECT_INGRESS_ENV.items():
        os.environ.setdefault(key, value)
    # an ingress replica that is deleted drains for at least this long (30 s by default, for load
    # balancers in front); the tests delete their apps and must not wait it out
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "num_gpus": 0, "include_dashboard": False},
    )
    for i in range(SIM_NODES):
        cluster.add_node(
            num_cpus=4,
            num_gpus=GPUS_PER_SIM_NODE,
            resources={f"sim_node_{i}": 1, "raymoe_node": 1},
        )
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, ignore_reinit_error=False, log_to_driver=True)
    try:
        yield RayTestCluster(cluster.address, SIM_NODES, GPUS_PER_SIM_NODE)
    finally:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        cluster.shutdown()
