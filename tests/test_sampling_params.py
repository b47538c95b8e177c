"""SamplingParams: defaults, normalisation, and a ValueError naming the field for every bad value."""

from __future__ import annotations

from typing import Any

import pytest

from raymoe import SamplingParams


def test_defaults_and_normalisation() -> None:
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (16, 1.0, 1.0, -1, None)
    assert p.stop_strings == () and p.stop_token_ids == [] and not p.ignore_eos and not p.logprobs
    assert SamplingParams(temperature=0).greedy and not p.greedy
    assert SamplingParams(stop="###").stop_strings == ("###",)
    assert SamplingParams(stop=["a", "bc"]).stop_strings == ("a", "bc")
    assert SamplingParams(top_k=0).top_k == -1  # 0 and -1 both switch top-k off
    assert isinstance(SamplingParams(temperature=1).temperature, float)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", 2.5),
        ("max_tokens", True),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", "hot"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("top_k", 3.0),
        ("seed", "abc"),
        ("stop", ""),
        ("stop", ["ok", 3]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["7"]),
        ("ignore_eos", "yes"),
        ("logprobs", 1),
        ("max_tokens", 2**63),
        ("temperature", float("inf")),
        ("temperature", 1e7),
        ("top_p", float("nan")),
        ("top_k", 2**63),
        ("top_k", 10**30),
        ("seed", 2**63),
        ("seed", -(2**63) - 1),
        ("stop", ["s"] * 17),
        ("stop", "x" * 1025),
        ("stop", 5),
        ("stop_token_ids", [2**63]),
        ("stop_token_ids", list(range(1025))),
    ],
)
def test_bad_values_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**{field: value})


def test_int64_bounds_are_inclusive() -> None:
    """The largest values a tensor holds are accepted: the bound is the representation, not a guess."""
    p = SamplingParams(max_tokens=2**63 - 1, top_k=2**63 - 1, seed=-(2**63), stop_token_ids=[2**63 - 1])
    assert (p.top_k, p.seed) == (2**63 - 1, -(2**63))
    p.validate()  # idempotent: the engine checks admitted params again
    assert SamplingParams(stop=["x" * 1024] * 16).stop_strings == ("x" * 1024,) * 16
