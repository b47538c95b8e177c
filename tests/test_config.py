"""Serve config: every deployment YAML validates; impossible layouts get messages naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raymoe.cli import main as cli_main
from raymoe.serve.config import ServeConfig, check_args, check_config, check_config_file, load_config_file

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENTS = sorted((ROOT / "deployments").glob("*.yaml"))


def test_deployment_files_exist() -> None:
    names = {p.name for p in DEPLOYMENTS}
    assert {"local.yaml", "h800-disaggregated.yaml"} <= names


@pytest.mark.parametrize("path", DEPLOYMENTS, ids=lambda p: p.name)
def test_every_deployment_yaml_is_valid(path: Path) -> None:
    assert check_config_file(path) == []


def test_h800_layout_is_deepseeks() -> None:
    cfg = load_config_file(ROOT / "deployments/h800-disaggregated.yaml")
    p, d = cfg.prefill.parallel_config(), cfg.decode.parallel_config()
    assert p is not None and d is not None
    assert (p.world_size, p.attention_tp, p.dp_size, p.redundant_experts) == (32, 4, 8, 32)
    assert (d.world_size, d.attention_tp, d.dp_size, d.shared_expert_gpus) == (320, 4, 80, 64)
    # 256 routed + 32 redundant over 32 GPUs: 9 slots per GPU
    assert (256 + p.redundant_experts) // p.world_size == 9
    assert d.attention_dp == 80 and d.expert_parallel == 320
    assert p.node_resource == "raymoe_prefill_node" and d.node_resource == "raymoe_decode_node"


def test_local_is_cpu_single_process() -> None:
    cfg = load_config_file(ROOT / "deployments/local.yaml")
    assert cfg.disaggregated and cfg.model.path is None
    assert cfg.prefill.parallel is None and cfg.decode.parallel is None  # CPU units
    assert cfg.prefill.parallel_config() is None and cfg.decode.parallel_config() is None
    assert cfg.prefill.num_gpus == 0 and cfg.prefill.dp_size == 1


@pytest.mark.parametrize(
    ("parallel", "field", "needle"),
    [
        (dict(nodes=1, gpus_per_node=6, attention_tp=4), "attention_tp", "not divisible into TP groups of 4"),
        (dict(nodes=2, gpus_per_node=4, attention_tp=8), "attention_tp", "would span nodes of 4 GPUs"),
        (dict(nodes=1, gpus_per_node=8, attention_tp=4, attention_dp=4), "attention_dp", "more ranks than GPUs"),
        (dict(nodes=4, gpus_per_node=8, attention_tp=4, expert_parallel=64), "expert_parallel", "more ranks than GPUs"),
        (dict(nodes=4, gpus_per_node=8, attention_tp=4, redundant_experts=30), "redundant_experts", "do not divide over EP32"),
        # a CPU unit is one without a `parallel` section: a layout with GPUs needs one per node at least
        (dict(nodes=2, gpus_per_node=0), "gpus_per_node", "greater than or equal to 1"),
        (dict(nodes=1, gpus_per_node=0, attention_tp=2), "gpus_per_node", "greater than or equal to 1"),
        (dict(nodes=1, gpus_per_node=8, shared_expert_gpus=8), "shared_expert_gpus", "leaves none for routed experts"),
        (dict(nodes=1, gpus_per_node=8, tensor_parallel=2), "tensor_parallel", "Extra inputs are not permitted"),
    ],
)
def test_impossible_layouts_are_named(parallel: dict[str, object], field: str, needle: str) -> None:
    """Refused by ParallelConfig's own validator (the expert-slot rules: its check with the model's
    expert count), each message with the field's whole path."""
    args = {"model": {"num_routed_experts": 256}, "prefill": {"parallel": parallel}}
    problems = check_args(args, inspect_checkpoint=False)
    assert any(p.startswith(f"prefill.parallel.{field}: ") and needle in p for p in problems), problems


def test_every_parallel_field_is_reachable_from_yaml() -> None:
    """A unit's `parallel:` is a whole ParallelConfig: the runtime's knobs reach the engine's executor."""
    parallel = {"nodes": 1, "gpus_per_node": 2, "overlap": True, "replica_choice": "static", "node_limited": False,
                "step_timeout_s": 60.0}
    cfg = ServeConfig.model_validate({"disaggregated": False, "decode": {"parallel": parallel}})
    got = cfg.decode.parallel_config()
    assert got is not None and got.model_dump(include=set(parallel)) == parallel
    one_gpu = ServeConfig.model_validate({"decode": {"parallel": {"gpus_per_node": 1}}}).decode
    assert one_gpu.num_gpus == 1 and one_gpu.parallel_config() is None  # the replica holds its one GPU


def test_serve_deployment_options_pass_through() -> None:
    """Serve's own option names and types: merged over the defaults, refused with the option's path."""
    cfg = ServeConfig.model_validate(
        {"decode": {"deployment": {"health_check_period_s": 3, "graceful_shutdown_timeout_s": 30,
                                   "ray_actor_options": {"num_cpus": 2}}}}
    )
    opts = cfg.decode.deployment_options()
    assert (opts["health_check_period_s"], opts["graceful_shutdown_timeout_s"]) == (3, 30)
    assert opts["ray_actor_options"] == {"num_cpus": 2} and opts["max_ongoing_requests"] == 1024
    defaults = cfg.prefill.deployment_options()
    assert (defaults["health_check_period_s"], defaults["graceful_shutdown_timeout_s"]) == (10.0, 5.0)
    bad = {"decode": {"deployment": {"health_check_period_s": 0, "num_gpuz": 1, "ray_actor_options": {"cpus": 1}}},
           "ingress": {"deployment": {"max_ongoing_requests": -1}}}
    problems = check_args(bad)
    assert any(p.startswith("decode.deployment.num_gpuz: not a Serve deployment option") for p in problems), problems
    assert "decode.deployment.ray_actor_options.cpus: not a Ray actor option" in problems
    assert any(p.startswith("ingress.deployment.max_ongoing_requests: ") for p in problems), problems
    only_bad_value = check_args({"decode": {"deployment": {"health_check_period_s": 0}}})
    assert only_bad_value == ["decode.deployment.health_check_period_s: Input should be greater than 0"]
    # autoscaling: no fixed count beside it; the stream rule counts its most replicas
    scaled = ServeConfig.model_validate({"ingress": {"deployment": {"autoscaling_config": {"max_replicas": 3}}}})
    assert "num_replicas" not in scaled.ingress.deployment_options() and scaled.ingress.replicas == 3
    both = {"ingress": {"deployment": {"num_replicas": 2, "autoscaling_config": {"max_replicas": 3}}}}
    assert check_args(both)[0].startswith("ingress.deployment: Manually setting num_replicas is not allowed")
    # the router that sends `replica=` calls to their replica is raymoe's own
    assert check_args({"prefill": {"deployment": {"request_router_config": {}}}})[0].startswith(
        "prefill.deployment.request_router_config: not a Serve deployment option raymoe leaves open"
    )


def test_serve_cap_must_hold_what_the_unit_admits() -> None:
    """Each request holds one open call on its unit replica, the streaming unit one per ingress too."""
    base = {"model": {"num_routed_experts": 256}, "ingress": {"deployment": {"num_replicas": 2}}}
    decode = {"max_waiting_requests": 8, "engine": {"max_num_seqs": 4}, "deployment": {"max_ongoing_requests": 13}}
    problems = check_config(ServeConfig.model_validate(base | {"decode": decode}), inspect_checkpoint=False)
    assert problems == [
        "decode.deployment.max_ongoing_requests: 13 is below what the unit admits (max_num_seqs 4 x DP1 + "
        "max_waiting_requests 8 = 12) + 2 output stream(s), one per ingress replica: set it to at least 14"
    ]
    decode["deployment"] = {"max_ongoing_requests": 14}
    assert check_config(ServeConfig.model_validate(base | {"decode": decode}), inspect_checkpoint=False) == []
    prefill = {"max_waiting_requests": 8, "engine": {"max_num_seqs": 4}, "deployment": {"max_ongoing_requests": 12}}
    assert check_config(ServeConfig.model_validate(base | {"prefill": prefill}), inspect_checkpoint=False) == []


def test_field_errors_name_the_field(tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "deployments/local.yaml").read_text())
    doc["applications"][0]["args"]["decode"]["parallel"] = {"gpus_per_node": -1}
    doc["applications"][0]["args"]["decode"]["tensor_parallel"] = 2  # unknown key
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    problems = check_config_file(bad)
    assert any(p.startswith("decode.parallel.gpus_per_node") for p in problems), problems
    assert any(p.startswith("decode.tensor_parallel") for p in problems), problems
    assert check_config_file(tmp_path / "missing.yaml")[0].endswith("no such deployment file")
    (tmp_path / "other.yaml").write_text("applications: [{import_path: foo:bar}]\n")
    assert "no application with import_path" in check_config_file(tmp_path / "other.yaml")[0]


def test_cli_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["check-config", str(ROOT / "deployments/h800-disaggregated.yaml")]) == 0
    assert capsys.readouterr().out.strip().endswith(": ok")
    doc = yaml.safe_load((ROOT / "deployments/h800-disaggregated.yaml").read_text())
    doc["applications"][0]["args"]["decode"]["parallel"]["attention_tp"] = 16
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert cli_main(["check-config", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "decode.parallel.attention_tp: a TP group of 16 GPUs would span nodes of 8 GPUs" in out
