"""cluster.yaml for `ray up`: its structure, and that its node types can host the deployment YAMLs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raymoe.serve.config import load_config_file, load_serve_yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_structure(cluster: dict) -> None:
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands", "max_workers"):
        assert key in cluster, key
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    for name, t in types.items():
        assert {"resources", "node_config", "min_workers", "max_workers"} <= set(t), name
        assert t["min_workers"] <= t["max_workers"], name
    assert sum(t["max_workers"] for n, t in types.items() if n != cluster["head_node_type"]) <= cluster["max_workers"]
    setup = " ".join(cluster["setup_commands"])
    assert "pip install" in setup and "raymoe" in setup
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--head" in head and "--dashboard-host=0.0.0.0" in head and "--metrics-export-port" in head
    assert "--metrics-export-port" in " ".join(cluster["worker_start_ray_commands"])
    # Serve reads its direct-ingress flag when Ray's processes start: every node starts with it
    from raymoe.serve.runner import DIRECT_INGRESS_ENV

    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cluster[key] if "ray start" in c]
        assert start and all(f"{k}={v} ray start" in c for c in start for k, v in DIRECT_INGRESS_ENV.items())
    gpu_types = [t for t in types.values() if t["resources"].get("GPU")]
    assert len(gpu_types) == 2 and all(t["resources"]["GPU"] == 8 for t in gpu_types)


def test_deployments_fit_the_cluster(cluster: dict) -> None:
    types = cluster["available_node_types"]
    by_resource = {r: (name, t) for name, t in types.items() for r in t["resources"] if r.startswith("raymoe_")}
    checked = 0
    for path in sorted((ROOT / "deployments").glob("*.yaml")):
        if path.name == "local-ep.yaml":  # one local machine declaring simulated GPUs, not cluster.yaml's nodes
            continue
        cfg = load_config_file(path)
        for r in cfg.ingress.deployment_options()["ray_actor_options"].get("resources", {}):
            assert r in by_resource, f"{path.name}: ingress.deployment.ray_actor_options.resources {r!r}"
        for label, unit in cfg.units().items():
            layout = unit.parallel
            if layout is None:  # a CPU unit
                assert "resources" not in unit.deployment_options()["ray_actor_options"], f"{path.name}: {label}"
                continue
            assert layout.node_resource in by_resource, f"{path.name}: {label}.parallel.node_resource {layout.node_resource!r}"
            name, t = by_resource[layout.node_resource]
            assert t["resources"]["GPU"] == layout.gpus_per_node, f"{path.name}: {label} GPUs per node vs {name}"
            need = layout.nodes * unit.replicas
            assert t["min_workers"] >= need and t["max_workers"] >= need, f"{path.name}: {label} needs {need} {name} nodes"
            checked += 1
        # the two unit kinds land on different node types
        if cfg.disaggregated and cfg.prefill.parallel and cfg.decode.parallel:
            assert cfg.prefill.parallel.node_resource != cfg.decode.parallel.node_resource
    assert checked >= 2  # the h800 layout's prefill and decode units


def test_head_declares_its_resource(cluster: dict) -> None:
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    app, _ = load_serve_yaml(ROOT / "deployments/h800-disaggregated.yaml")
    assert app["import_path"] == "raymoe.serve.app:build_app"
    assert "raymoe_head_node" in head["resources"]
