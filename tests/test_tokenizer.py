"""The checkpoint tokenizer: BOS handling, round trips, special tokens, DeepSeek's chat template."""

from __future__ import annotations

from pathlib import Path

import pytest

from raymoe.model.tiny import ADDED_SPECIAL_TOKENS, BOS, EOS, make_tiny
from raymoe.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(
        tmp_path_factory.mktemp("tok") / "ck", progress=False, num_hidden_layers=3, n_routed_experts=16, n_group=4,
        topk_group=2, hidden_size=64, intermediate_size=64, moe_intermediate_size=16,
    )


@pytest.fixture(scope="module")
def tok(ckpt: Path) -> Tokenizer:
    t = Tokenizer.from_checkpoint(ckpt)
    assert t is not None
    return t


def test_none_without_tokenizer_json(tmp_path: Path) -> None:
    assert Tokenizer.from_checkpoint(tmp_path) is None


def test_encode_adds_bos_and_round_trips(tok: Tokenizer) -> None:
    text = "Hello! How are you today? Ünïcödé 日本語 and numbers 12345."
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 0 and tok.eos_token_ids == [1]
    assert ids[1:] == tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == BOS + text
    assert len(tok.encode("The weather today", add_bos=False)) <= 3  # learned merges, not bytes
    assert max(ids) < tok.vocab_size


def test_special_tokens_are_single_ids(tok: Tokenizer) -> None:
    for t in (BOS, EOS, *ADDED_SPECIAL_TOKENS):
        ids = tok.encode(t, add_bos=False)
        assert len(ids) == 1 and tok.id_to_token(ids[0]) == t


def test_chat_template_matches_deepseek_v3(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a planet."},
    ]
    text = tok.apply_chat_template(messages)
    assert text == (
        "<｜begin▁of▁sentence｜>You are terse.<｜User｜>Hi<｜Assistant｜>Hello.<｜end▁of▁sentence｜>"
        "<｜User｜>Name a planet.<｜Assistant｜>"
    )
    assert tok.apply_chat_template(messages, add_generation_prompt=False).endswith("Name a planet.")
    ids = tok.encode(text)  # the rendered BOS is not doubled
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"content": "x"}])


def test_chat_template_agrees_with_transformers(ckpt: Path, tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(ckpt))
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert tok.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = "The quick brown fox."
    assert tok.encode(text) == ref(text)["input_ids"]


def test_tokenizer_config_is_respected(ckpt: Path, tmp_path: Path) -> None:
    """add_bos_token false and extra EOS ids in generation_config.json, as other checkpoints have."""
    import json
    import shutil

    path = tmp_path / "ck"
    shutil.copytree(ckpt, path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = False
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    tok = Tokenizer.from_checkpoint(path)
    assert tok is not None
    assert tok.encode("Hi")[0] != tok.bos_token_id and tok.encode("Hi", add_bos=True)[0] == tok.bos_token_id
    assert tok.eos_token_ids == [1, 7]


@pytest.mark.parametrize(
    ("file", "content", "error"),
    [
        ("tokenizer.json", '{"model": 1', r"tokenizer.json: cannot load"),
        ("tokenizer_config.json", "[1]", r"tokenizer_config.json: expected a JSON object"),
        ("generation_config.json", "{eos", r"generation_config.json: not valid JSON"),
        ("generation_config.json", "[1]", r"generation_config.json: expected a JSON object"),
        ("config.json", '{"vocab_size": "many"}', r"config.json"),
    ],
)
def test_a_broken_file_is_an_error_not_a_default(
    ckpt: Path, tmp_path: Path, file: str, content: str, error: str
) -> None:
    """A present but unreadable file is reported, never silently replaced by defaults (e.g. fewer EOS ids)."""
    import shutil

    path = tmp_path / "ck"
    shutil.copytree(ckpt, path)
    (path / file).write_text(content)
    with pytest.raises(ValueError, match=error):
        Tokenizer.from_checkpoint(path)


def test_faults_other_than_a_malformed_file_are_not_reworded(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only tokenizers' bare Exception means "malformed"; anything else raised while loading propagates as is."""
    import raymoe.model.tokenizer as module

    class Broken:
        @staticmethod
        def from_str(text: str) -> None:
            raise MemoryError("out of memory")

    monkeypatch.setattr(module, "HFTokenizer", Broken)
    with pytest.raises(MemoryError):
        Tokenizer.from_checkpoint(ckpt)
