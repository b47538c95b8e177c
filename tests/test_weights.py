"""Checkpoint loading: FP8 block dequantisation, expert subsets, MTP skipping, and bad checkpoints."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from raymoe.model.config import ModelConfig
from raymoe.model.tiny import make_tiny
from raymoe.model.weights import INDEX_FILE, CheckpointReader, load_checkpoint

# small, but with tiles that are partial (64, 80 rows) and spill over one 128 block (160)
SMALL = dict(
    vocab_size=200,
    hidden_size=64,
    intermediate_size=160,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=2,
    q_lora_rank=48,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=16,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=2,
)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    kw = dict(seed=7, tokenizer=False, progress=False, max_shard_bytes=64 << 10, **SMALL)
    return {
        "bf16": make_tiny(root / "bf16", fp8=False, **kw),
        "fp8": make_tiny(root / "fp8", fp8=True, **kw),
    }


def raw(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    out = {}
    for shard in sorted(set(index.values())):
        with safe_open(path / shard, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                out[name] = f.get_tensor(name)
    return out


def reference_dequant(w_bf16: torch.Tensor) -> torch.Tensor:
    """Independent 128x128 tile-by-tile e4m3 quantise + dequantise (loops, no shared helper)."""
    w = w_bf16.float()
    out = torch.empty_like(w)
    for i in range(0, w.shape[0], 128):
        for j in range(0, w.shape[1], 128):
            tile = w[i : i + 128, j : j + 128]
            s = max(tile.abs().max().item(), 1e-12) / 448.0
            out[i : i + 128, j : j + 128] = (tile / s).to(torch.float8_e4m3fn).float() * s
    return out


def test_sharded_with_index_and_mtp_layer(ckpts: dict[str, Path]) -> None:
    path = ckpts["bf16"]
    index = json.loads((path / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert index["metadata"]["total_size"] > 0
    config = ModelConfig.from_checkpoint(path)
    mtp = f"model.layers.{config.num_hidden_layers}."
    assert any(n.startswith(mtp + "eh_proj") for n in index["weight_map"])
    reader = CheckpointReader(path)
    load_checkpoint(path, reader=reader, progress=False)
    assert not [n for n in reader.read_names if n.startswith(mtp)]
    assert len(reader.read_names) == len(set(reader.read_names))


def test_fp8_checkpoint_loads_to_its_dequantised_values(ckpts: dict[str, Path]) -> None:
    """Same seed, bf16 and fp8 files: every FP8 weight loads to quantise+dequantise of the bf16 one."""
    bf16, fp8 = raw(ckpts["bf16"]), raw(ckpts["fp8"])
    config = json.loads((ckpts["fp8"] / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    model = load_checkpoint(ckpts["fp8"], progress=False)
    params = dict(model.state_dict())
    quantised = [n for n, t in fp8.items() if t.dtype == torch.float8_e4m3fn]
    assert any(".experts." in n for n in quantised) and any("self_attn.kv_b_proj" in n for n in quantised)
    assert "model.layers.1.mlp.gate.weight" not in quantised and "lm_head.weight" not in quantised
    checked = 0
    for name, t in bf16.items():
        ours = name.removeprefix("model.")
        if ours not in params:
            continue  # MTP layer
        if name in quantised:
            scale = fp8[name + "_scale_inv"]
            assert scale.dtype == torch.float32
            assert tuple(scale.shape) == (math.ceil(t.shape[0] / 128), math.ceil(t.shape[1] / 128))
            want = reference_dequant(t)
            assert (params[ours] - t.float()).abs().max() <= t.float().abs().max() / 8  # e4m3 precision
        else:
            want = t.float()
        torch.testing.assert_close(params[ours], want, atol=0, rtol=0, msg=name)
        checked += 1
    assert checked == len(params)


def test_subset_reads_only_requested_experts(ckpts: dict[str, Path]) -> None:
    path = ckpts["fp8"]
    config = ModelConfig.from_checkpoint(path)
    full = load_checkpoint(path, progress=False)
    reader = CheckpointReader(path)
    subset = load_checkpoint(path, experts={1: [3, 12], 2: [0]}, reader=reader, progress=False)
    read_experts = {n for n in reader.read_names if ".mlp.experts." in n}
    want = {
        f"model.layers.{layer}.mlp.experts.{e}.{p}.weight{suffix}"
        for layer, ids in {1: [3, 12], 2: [0]}.items()
        for e in ids
        for p in ("gate_proj", "up_proj", "down_proj")
        for suffix in ("", "_scale_inv")
    }
    assert read_experts == want
    # everything else that is not an expert was read once
    others = {n for n in reader.read_names if ".mlp.experts." not in n}
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in others
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in others
    moe = subset.layers[1].mlp
    assert moe.hosted_experts == [3, 12] and subset.layers[2].mlp.hosted_experts == [0]
    torch.testing.assert_close(moe.experts[12].down_proj.weight, full.layers[1].mlp.experts[12].down_proj.weight)
    # one id list for every MoE layer
    reader = CheckpointReader(path)
    load_checkpoint(path, experts=[5], reader=reader, progress=False)
    layers = {int(n.split(".")[2]) for n in reader.read_names if ".experts.5." in n}
    assert layers == set(config.moe_layers)
    assert not [n for n in reader.read_names if ".experts." in n and ".experts.5." not in n]
    with pytest.raises(ValueError, match=r"expert ids \[16\] out of range"):
        load_checkpoint(path, experts=[16], progress=False)
    with pytest.raises(ValueError, match=r"experts: layer 0 is not a MoE layer \(MoE layers: \[1, 2\]\)"):
        load_checkpoint(path, experts={0: [1]}, progress=False)


def _single_file_copy(src: Path, dst: Path, edit: dict[str, torch.Tensor | None]) -> Path:
    """The checkpoint as one model.safetensors, with tensors replaced (or removed when None)."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = raw(src)
    for name, t in edit.items():
        if t is None:
            del tensors[name]
        else:
            tensors[name] = t
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


A = "model.layers.0.self_attn.kv_b_proj.weight"


@pytest.mark.parametrize(
    ("case", "edit", "message"),
    [
        ("missing", {A: None}, f"missing tensor '{A}'"),
        ("shape", {A: torch.zeros(3, 3, dtype=torch.bfloat16)}, f"tensor '{A}' has shape \\(3, 3\\), expected \\(64, 32\\)"),
        ("dtype", {A: torch.zeros(64, 32, dtype=torch.int32)}, f"tensor '{A}' has unsupported dtype I32"),
        ("dtype64", {A: torch.zeros(64, 32, dtype=torch.float64)}, f"tensor '{A}' has unsupported dtype F64"),
        ("noscale", {A + "_scale_inv": None}, f"FP8 tensor '{A}' has no '{A}_scale_inv'"),
        ("badscale", {A + "_scale_inv": torch.ones(2, 2)}, f"'{A}_scale_inv' has shape \\(2, 2\\), expected \\(1, 1\\)"),
    ],
)
def test_bad_checkpoint_names_the_tensor(
    ckpts: dict[str, Path], tmp_path: Path, case: str, edit: dict[str, torch.Tensor | None], message: str
) -> None:
    src = ckpts["fp8"] if case in ("noscale", "badscale") else ckpts["bf16"]
    path = _single_file_copy(src, tmp_path / case, edit)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(path, progress=False)


def test_bad_config_and_layout_are_named(ckpts: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "ck"
    shutil.copytree(ckpts["bf16"], path)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["kv_lora_rank"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing key 'kv_lora_rank'"):
        load_checkpoint(path, progress=False)
    cfg["kv_lora_rank"] = 32
    cfg["scoring_func"] = "softmax"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="scoring_func 'softmax' is not supported"):
        load_checkpoint(path, progress=False)
    del cfg["scoring_func"]
    (path / "config.json").write_text(json.dumps(cfg))
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ValueError, match=f"shard '{shard.name}' listed in"):
        load_checkpoint(path, progress=False)
    for f in path.glob("model*"):
        f.unlink()
    with pytest.raises(ValueError, match="no model.safetensors.index.json or model.safetensors"):
        load_checkpoint(path, progress=False)
    with pytest.raises(ValueError, match="no config.json"):
        load_checkpoint(tmp_path, progress=False)
