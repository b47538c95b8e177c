"""Serve config: every deployment YAML validates; impossible layouts get messages naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raymoe.cli import main as cli_main
from raymoe.serve.config import ServeConfig, UnitConfig, check_config, check_config_file, load_config_file

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
    p, d = cfg.prefill, cfg.decode
    assert (p.num_gpus, p.attention_tp, p.dp_size, p.ep_size, p.redundant_experts) == (32, 4, 8, 32, 32)
    assert (d.num_gpus, d.attention_tp, d.dp_size, d.ep_size, d.shared_expert_gpus) == (320, 4, 80, 320, 64)
    # 256 routed + 32 redundant over 32 GPUs: 9 slots per GPU
    assert (256 + p.redundant_experts) // p.ep_size == 9
    spec = d.parallel_spec()
    assert spec is not None and spec["attention_dp"] == 80 and spec["expert_parallel"] == 320


def test_local_is_cpu_single_process() -> None:
    cfg = load_config_file(ROOT / "deployments/local.yaml")
    assert cfg.disaggregated and cfg.model.path is None
    assert cfg.prefill.parallel_spec() is None and cfg.decode.parallel_spec() is None


def _unit(**kw: object) -> UnitConfig:
    return UnitConfig.model_validate(kw)


@pytest.mark.parametrize(
    ("unit", "needle"),
    [
        (dict(nodes=1, gpus_per_node=6, attention_tp=4), "not divisible into TP groups of 4"),
        (dict(nodes=2, gpus_per_node=4, attention_tp=8), "would span nodes of 4 GPUs"),
        (dict(nodes=1, gpus_per_node=8, attention_tp=4, attention_dp=4), "more ranks than GPUs"),
        (dict(nodes=4, gpus_per_node=8, attention_tp=4, expert_parallel=64), "more ranks than GPUs"),
        (dict(nodes=4, gpus_per_node=8, attention_tp=4, redundant_experts=30), "do not divide over EP32"),
        (dict(nodes=2, gpus_per_node=0), "runs on one node"),
        (dict(nodes=1, gpus_per_node=0, attention_tp=2), "no tensor parallelism"),
        (dict(nodes=1, gpus_per_node=8, shared_expert_gpus=8), "leaves none for routed experts"),
    ],
)
def test_impossible_layouts_are_named(unit: dict[str, object], needle: str) -> None:
    cfg = ServeConfig.model_validate({"model": {"num_routed_experts": 256}, "prefill": unit})
    problems = check_config(cfg, inspect_checkpoint=False)
    assert any(needle in p and p.startswith("prefill") for p in problems), problems


def test_serve_cap_must_hold_what_the_unit_admits() -> None:
    """Each request holds one open call on its unit replica, the streaming unit one per ingress too."""
    base = {"model": {"num_routed_experts": 256}, "ingress": {"num_replicas": 2}}
    decode = {"max_waiting_requests": 8, "engine": {"max_num_seqs": 4}, "max_ongoing_requests": 13}
    problems = check_config(ServeConfig.model_validate(base | {"decode": decode}), inspect_checkpoint=False)
    assert problems == [
        "decode.max_ongoing_requests: 13 is below what the unit admits (max_num_seqs 4 x DP1 + "
        "max_waiting_requests 8 = 12) + 2 output stream(s), one per ingress replica: set it to at least 14"
    ]
    decode["max_ongoing_requests"] = 14
    assert check_config(ServeConfig.model_validate(base | {"decode": decode}), inspect_checkpoint=False) == []
    prefill = {"max_waiting_requests": 8, "engine": {"max_num_seqs": 4}, "max_ongoing_requests": 12}
    assert check_config(ServeConfig.model_validate(base | {"prefill": prefill}), inspect_checkpoint=False) == []


def test_field_errors_name_the_field(tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "deployments/local.yaml").read_text())
    doc["applications"][0]["args"]["decode"]["gpus_per_node"] = -1
    doc["applications"][0]["args"]["decode"]["tensor_parallel"] = 2  # unknown key
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    problems = check_config_file(bad)
    assert any(p.startswith("decode.gpus_per_node") for p in problems), problems
    assert any(p.startswith("decode.tensor_parallel") for p in problems), problems
    assert check_config_file(tmp_path / "missing.yaml")[0].endswith("no such deployment file")
    (tmp_path / "other.yaml").write_text("applications: [{import_path: foo:bar}]\n")
    assert "no application with import_path" in check_config_file(tmp_path / "other.yaml")[0]


def test_cli_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["check-config", str(ROOT / "deployments/h800-disaggregated.yaml")]) == 0
    assert capsys.readouterr().out.strip().endswith(": ok")
    doc = yaml.safe_load((ROOT / "deployments/h800-disaggregated.yaml").read_text())
    doc["applications"][0]["args"]["decode"]["attention_tp"] = 16
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert cli_main(["check-config", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "decode.attention_tp: a TP group of 16 GPUs would span nodes of 8 GPUs" in out
