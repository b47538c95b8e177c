"""The output side of the engine: incremental detokenization against the tokenizer's own decode."""

from __future__ import annotations

import random

import pytest

from raymoe.engine.output_processor import IncrementalDetokenizer
from raymoe.model.tiny import default_checkpoint
from raymoe.model.tokenizer import Tokenizer

TEXT = "experts über alles, 日本語 done 🤖!"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    t = Tokenizer.from_checkpoint(default_checkpoint())
    assert t is not None
    return t


def stream(tok: Tokenizer, ids: list[int], chunk: int, hold: int = 0) -> tuple[IncrementalDetokenizer, list[str]]:
    d = IncrementalDetokenizer(tok, hold)
    return d, [d.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]


def test_stream_is_decode_on_random_tokens(tok: Tokenizer) -> None:
    """Random ids (special tokens, lone UTF-8 bytes, characters cut between tokens): what is streamed is
    always a prefix of decode of the final ids (never half a character), and finish completes it exactly."""
    rng = random.Random(0)
    cut_inside = 0
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 24))]
        chunk = rng.choice([1, 1, 2, 5])
        want = tok.decode(ids)
        d, pieces = stream(tok, ids, chunk)
        sent = ""
        for k, piece in enumerate(pieces):
            sent += piece
            assert want.startswith(sent)
            assert tok.decode(ids[: (k + 1) * chunk]).startswith(sent)
        cut_inside += sent != want
        assert sent + d.finish(None) == want
    assert cut_inside > 10  # the sample has sequences that end inside a character


def test_multibyte_characters_wait_for_their_last_byte(tok: Tokenizer) -> None:
    ids = tok.encode(TEXT, add_bos=False)
    assert len(ids) > len(TEXT.split())  # some characters take several byte tokens
    d, pieces = stream(tok, ids, 1)
    assert "\ufffd" not in "".join(pieces) and "".join(pieces) == TEXT
    assert "" in pieces  # a token inside a character shows nothing yet
    assert d.finish(None) == ""
    # ending inside a character: finish has what decode has (U+FFFD for the incomplete bytes)
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    d, pieces = stream(tok, ids[:cut], 1)
    assert "".join(pieces) + d.finish(None) == tok.decode(ids[:cut])


def test_hold_keeps_back_a_stop_string_prefix(tok: Tokenizer) -> None:
    text = "experts über alles, done"
    ids = tok.encode(text, add_bos=False)
    d, pieces = stream(tok, ids, 1, hold=3)
    streamed = "".join(pieces)
    assert "\ufffd" not in streamed and text.startswith(streamed) and len(streamed) <= len(text) - 3
    assert streamed + d.finish(None) == text
    # a stop string ", d" (hold 2): what was streamed never reaches into the cut-off match
    d = IncrementalDetokenizer(tok, hold=2)
    sent, pushed = "", []
    for t in ids:  # the chunk completing the stop string finishes the request: it is never pushed
        pushed.append(t)
        if ", d" in tok.decode(pushed):
            break
        sent += d.push([t])
        assert len(sent) <= len(tok.decode(pushed)) - 2
    final = text[: text.index(", d")]
    assert sent and final.startswith(sent)
    assert sent + d.finish(final) == final
