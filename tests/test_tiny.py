"""The tiny checkpoint writer: structure, the make-tiny command line, and the cached default."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from raymoe.cli import main
from raymoe.model.attention import AttentionMetadata
from raymoe.model.config import ModelConfig
from raymoe.model.tiny import default_checkpoint
from raymoe.model.tokenizer import Tokenizer
from raymoe.model.weights import load_checkpoint


@pytest.fixture(scope="module")
def default_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """default_checkpoint() under a private cache, created by two racing threads."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RAYMOE_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        results: list[Path] = []
        errors: list[BaseException] = []

        def first_use() -> None:
            try:
                results.append(default_checkpoint())
            except BaseException as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=first_use) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert results[0] == results[1]
        assert default_checkpoint() == results[0]  # cached: no rewrite
        leftovers = [p.name for p in results[0].parent.iterdir() if p != results[0]]
        assert leftovers == []
        return results[0]
    finally:
        mp.undo()


def test_default_keeps_every_structural_feature(default_path: Path) -> None:
    c = ModelConfig.from_checkpoint(default_path)
    assert default_path.name == "tiny-deepseek-v3"
    assert c.first_k_dense_replace >= 2 and c.num_hidden_layers - c.first_k_dense_replace >= 2
    assert c.n_routed_experts >= 16 and c.n_group >= 4 and c.topk_group < c.n_group
    assert c.n_shared_experts >= 1 and c.q_lora_rank is not None
    assert c.rope_scaling is not None and c.rope_scaling.factor == 40 and c.rope_scaling.mscale_all_dim == 1.0
    assert c.num_nextn_predict_layers == 1
    tok = Tokenizer.from_checkpoint(default_path)
    assert tok is not None and tok.vocab_size == c.vocab_size <= 4096


def test_default_generates_greedily(default_path: Path) -> None:
    model = load_checkpoint(default_path, progress=False)
    tok = Tokenizer.from_checkpoint(default_path)
    assert tok is not None
    ids = tok.encode("The capital of France is")
    with torch.no_grad():
        logits = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), AttentionMetadata.contiguous([len(ids)])))
    assert logits.shape == (len(ids), model.config.vocab_size) and torch.isfinite(logits).all()
    assert logits[-1].std() > 0.05 and len(set(logits.argmax(-1).tolist())) > 1


def test_make_tiny_cli_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ck"
    assert main(["make-tiny", str(out), "--fp8", "--seed", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raymoe: wrote a tiny DeepSeek-V3-shaped fp8") and str(out) in lines[0]
    config = ModelConfig.from_checkpoint(out)
    assert config.quantization_config is not None
    model = load_checkpoint(out, progress=False)
    assert model.layers[config.first_k_dense_replace].mlp.experts[0].gate_proj.weight.dtype == torch.float32
    assert Tokenizer.from_checkpoint(out) is not None
    # the same seed writes the same weights; another seed others
    assert main(["make-tiny", str(tmp_path / "again"), "--fp8", "--seed", "3"]) == 0
    assert main(["make-tiny", str(tmp_path / "other"), "--fp8", "--seed", "4"]) == 0
    same = load_checkpoint(tmp_path / "again", progress=False)
    other = load_checkpoint(tmp_path / "other", progress=False)
    assert torch.equal(same.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)
    (tmp_path / "file").write_text("x")
    capsys.readouterr()
    assert main(["make-tiny", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("raymoe: error: ")
