"""The model against transformers' DeepseekV3ForCausalLM, and its two attention paths against each other.

Checkpoints are written by transformers' own `save_pretrained` (random weights, float32) and read
by raymoe's loader, so names, layouts and the math are all checked at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from raymoe.model.attention import AttentionMetadata
from raymoe.model.deepseek_v3 import Transformer
from raymoe.model.weights import load_checkpoint

transformers = pytest.importorskip("transformers")

from hf_reference import COMMON, save_random_reference  # noqa: E402
from hf_reference import CONFIGS as HF_CONFIGS  # noqa: E402

# "flat" here also has odd head and latent widths: rope pairs sit at odd offsets
CONFIGS: dict[str, dict[str, Any]] = {
    "grouped": HF_CONFIGS["grouped"],
    "flat": {**HF_CONFIGS["flat"], "kv_lora_rank": 31, "qk_nope_head_dim": 15, "v_head_dim": 12},
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Transformer]:
    """(transformers model, raymoe model loaded from its save_pretrained checkpoint)."""
    path = tmp_path_factory.mktemp(f"hf-{request.param}")
    hf = save_random_reference({**COMMON, **CONFIGS[request.param]}, path)
    ours = load_checkpoint(path, progress=False)
    return hf, ours


def hf_logits(hf: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


PROMPTS = [[5, 17, 99, 3, 42, 8, 77], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [64, 100]]


@pytest.mark.parametrize("attention", ["matmul", "sdpa"])
def test_prompt_logits_match_transformers(
    reference: tuple[Any, Transformer], attention: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from raymoe.model.deepseek_v3 import MLA

    if attention == "sdpa":  # the path long prompts take
        monkeypatch.setattr(MLA, "PREFILL_SCORES_MAX", 0)
    hf, ours = reference
    ids = torch.tensor([t for p in PROMPTS for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in PROMPTS])
    with torch.no_grad():
        logits = ours.compute_logits(ours(ids, positions, AttentionMetadata.contiguous([len(p) for p in PROMPTS])))
    start = 0
    for p in PROMPTS:
        ref = hf_logits(hf, p)
        torch.testing.assert_close(logits[start : start + len(p)], ref, atol=1e-4, rtol=0)
        assert ref.std() > 0.1  # not a degenerate model
        start += len(p)


def test_routing_is_group_limited_and_spread(reference: tuple[Any, Transformer]) -> None:
    """The grouped config must exercise the group mask: unrestricted top-k would pick other experts."""
    _, ours = reference
    cfg = ours.config
    moe = ours.layers[cfg.first_k_dense_replace].mlp
    x = torch.randn(64, cfg.hidden_size)
    ids, weights = moe.route(x)
    assert ids.shape == weights.shape == (64, cfg.num_experts_per_tok) and ids.dtype == torch.int64
    assert len(ids.unique()) == cfg.n_routed_experts  # every expert gets some token
    if cfg.topk_group < cfg.n_group:
        per_group = cfg.n_routed_experts // cfg.n_group
        assert ((ids // per_group).unique(dim=None).numel()) > cfg.topk_group  # different tokens, different groups
        assert all(len(set((row // per_group).tolist())) <= cfg.topk_group for row in ids)
        scores = torch.sigmoid(x @ moe.gate.weight.T) + moe.gate.e_score_correction_bias
        free = scores.topk(cfg.num_experts_per_tok, dim=-1)[1]
        changed = [set(a.tolist()) != set(b.tolist()) for a, b in zip(ids, free, strict=True)]
        assert any(changed)
    if cfg.norm_topk_prob:
        torch.testing.assert_close(weights.sum(-1), torch.full((64,), cfg.routed_scaling_factor))


def run_paged(
    model: Transformer, prompts: list[list[int]], chunks: list[list[int]], block_size: int = 4
) -> list[torch.Tensor]:
    """Feed each prompt through a paged cache in steps; chunks[step][s] new tokens of sequence s (0 = idle).

    Returns per-sequence logits of every fed position, in order. Block tables are shuffled, so
    sequences' blocks interleave in the cache.
    """
    cfg = model.config
    need = [-(-len(p) // block_size) for p in prompts]
    perm = torch.randperm(sum(need) + 1, generator=torch.Generator().manual_seed(1)).tolist()
    perm.remove(0)  # block 0 is the padding id: keep it unused so a bad table shows up
    tables, k = [], 0
    for n in need:
        tables.append(perm[k : k + n])
        k += n
    cache = torch.zeros(model.kv_cache_shape(sum(need) + 1, block_size))
    done = [0] * len(prompts)
    out: list[list[torch.Tensor]] = [[] for _ in prompts]
    for step in chunks:
        seqs = [s for s, n in enumerate(step) if n]
        ids = [t for s in seqs for t in prompts[s][done[s] : done[s] + step[s]]]
        pos = [i for s in seqs for i in range(done[s], done[s] + step[s])]
        md = AttentionMetadata.paged(
            [step[s] for s in seqs], [done[s] + step[s] for s in seqs], [tables[s] for s in seqs], block_size
        )
        with torch.no_grad():
            logits = model.compute_logits(model(torch.tensor(ids), torch.tensor(pos), md, cache))
        start = 0
        for s in seqs:
            out[s].append(logits[start : start + step[s]])
            start += step[s]
            done[s] += step[s]
    assert done == [len(p) for p in prompts] and cfg.kv_cache_dim == cache.shape[-1]
    return [torch.cat(o) for o in out]


def test_absorbed_decode_matches_expanded_prefill(reference: tuple[Any, Transformer]) -> None:
    """Chunked prefill, then one token per step (absorbed MLA), mixed with other sequences' prefill."""
    hf, ours = reference
    prompts = PROMPTS
    # step 0: all prefill chunks; step 1: seq 0 decodes while seq 1 prefills a chunk against its cache
    # (steps 2-4: all-decode batches; steps 5-6: a single sequence decoding)
    chunks = [[3, 5, 1], [1, 3, 1], [1, 1, 0], [1, 1, 0], [1, 1, 0], [0, 1, 0], [0, 1, 0]]
    got = run_paged(ours, prompts, chunks)
    for p, g in zip(prompts, got, strict=True):
        ref = hf_logits(hf, p)
        torch.testing.assert_close(g, ref, atol=1e-4, rtol=0)


def test_expert_forward_is_a_sum_over_hosts(reference: tuple[Any, Transformer]) -> None:
    """Expert hosts holding disjoint subsets produce partial outputs that add up to the full layer."""
    _, ours = reference
    cfg = ours.config
    moe = ours.layers[cfg.first_k_dense_replace].mlp
    x = torch.randn(10, cfg.hidden_size)
    ids, weights = moe.route(x)
    full = moe.expert_forward(x, ids, weights)
    saved = list(moe.experts)
    try:
        parts = []
        for host in (range(0, cfg.n_routed_experts, 2), range(1, cfg.n_routed_experts, 2)):
            for e in range(cfg.n_routed_experts):
                moe.experts[e] = saved[e] if e in host else None
            parts.append(moe.expert_forward(x, ids, weights))
    finally:
        for e, m in enumerate(saved):
            moe.experts[e] = m
    torch.testing.assert_close(parts[0] + parts[1], full, atol=1e-5, rtol=0)
    assert parts[0].abs().sum() > 0 and parts[1].abs().sum() > 0


def test_bad_cache_and_metadata_are_rejected(reference: tuple[Any, Transformer]) -> None:
    _, ours = reference
    md = AttentionMetadata.paged([2], [2], [[1]], 4)
    with pytest.raises(ValueError, match="kv_cache shape"):
        ours(torch.tensor([1, 2]), torch.arange(2), md, torch.zeros(1, 2, 4, 8))
    with pytest.raises(ValueError, match="positions"):
        ours(torch.tensor([1, 2]), torch.arange(3), AttentionMetadata.contiguous([2]))
    with pytest.raises(ValueError, match="query_len"):
        AttentionMetadata.paged([3], [2], [[1]], 4)


def test_save_pretrained_layout_has_no_index(tmp_path: Path) -> None:
    """A single model.safetensors (no index) loads too: the layout transformers writes for small models."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**{**COMMON, **CONFIGS["flat"]}))
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "model.safetensors.index.json").exists()
    model = load_checkpoint(tmp_path, progress=False, dtype="bfloat16")
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    torch.testing.assert_close(model.norm.weight.float(), hf.model.norm.weight.detach())
    # a bfloat16 forward runs (float32 logits) and tracks the float32 reference
    ids = PROMPTS[1]
    with torch.no_grad():
        got = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), AttentionMetadata.contiguous([len(ids)])))
    ref = hf_logits(hf.eval(), ids)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert torch.corrcoef(torch.stack([got.flatten(), ref.flatten()]))[0, 1] > 0.99


def reference_moe(moe: Any, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the definition the grouped paths must reproduce."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(ids[t].tolist(), weights[t].tolist(), strict=True):
            if moe.experts[e] is not None:
                out[t] += w * moe.experts[e](x[t : t + 1])[0]
    return out


@pytest.mark.parametrize("tokens", [1, 3, 32, 200])
def test_expert_forward_paths_agree(reference: tuple[Any, Transformer], tokens: int) -> None:
    """Padded batched matmul and the per-expert loop both equal the per-token definition."""
    _, ours = reference
    moe = ours.layers[ours.config.first_k_dense_replace].mlp
    x = torch.randn(tokens, ours.config.hidden_size)
    ids, weights = moe.route(x)
    want = reference_moe(moe, x, ids, weights)
    try:
        moe.GROUPED_MM = True
        torch.testing.assert_close(moe.expert_forward(x, ids, weights), want, atol=1e-5, rtol=1e-5)
        moe.GROUPED_MM = False
        for pad in (10**9, -(10**9)):  # always batched, never batched
            moe.PAD_ROWS_PER_EXPERT = pad
            torch.testing.assert_close(moe.expert_forward(x, ids, weights), want, atol=1e-5, rtol=1e-5)
    finally:
        del moe.PAD_ROWS_PER_EXPERT, moe.GROUPED_MM
    with pytest.raises(ValueError, match="expert ids must be in"):
        moe.expert_forward(x, torch.full_like(ids, ours.config.n_routed_experts), weights)


def test_expert_weight_updates_are_seen(reference: tuple[Any, Transformer]) -> None:
    """The batched weights follow in-place copies (migration) and swapped expert modules."""
    from raymoe.model.deepseek_v3 import MLP

    _, ours = reference
    cfg = ours.config
    moe = ours.layers[cfg.first_k_dense_replace].mlp
    x = torch.randn(16, cfg.hidden_size)
    ids, weights = moe.route(x)
    ids = torch.zeros_like(ids)  # everything to expert 0
    old = moe.experts[0]
    moe._stack = None
    with torch.inference_mode():  # as the engine runs it: the stack must still be updatable afterwards
        before = moe.expert_forward(x, ids, weights).clone()
    try:
        with torch.no_grad():
            saved = old.down_proj.weight.clone()
            old.down_proj.weight.mul_(2.0)  # in place, e.g. a migrated expert copied in
            torch.testing.assert_close(moe.expert_forward(x, ids, weights), 2 * before, atol=1e-5, rtol=1e-5)
            old.down_proj.weight.copy_(saved)
        fresh = MLP(cfg.hidden_size, cfg.moe_intermediate_size)
        moe.experts[0] = fresh
        torch.testing.assert_close(moe.expert_forward(x, ids, weights), reference_moe(moe, x, ids, weights))
    finally:
        moe.experts[0] = old
    torch.testing.assert_close(moe.expert_forward(x, ids, weights), before)


def test_empty_batch_through_moe(reference: tuple[Any, Transformer]) -> None:
    """Expert-parallel ranks with no tokens still run the MoE steps (they join every collective)."""
    _, ours = reference
    moe = ours.layers[ours.config.first_k_dense_replace].mlp
    x = torch.zeros(0, ours.config.hidden_size)
    ids, weights = moe.route(x)
    assert ids.shape == (0, ours.config.num_experts_per_tok) and ids.dtype == torch.int64
    assert moe.expert_forward(x, ids, weights).shape == (0, ours.config.hidden_size)
    assert moe(x).shape == ours.layers[0].mlp(x).shape == (0, ours.config.hidden_size)


def test_empty_step(reference: tuple[Any, Transformer]) -> None:
    """A step with no tokens (an idle data-parallel rank) runs, with and without a cache."""
    _, ours = reference
    none = torch.zeros(0, dtype=torch.long)
    cache = torch.zeros(ours.kv_cache_shape(2, 4))
    for md, kv in ((AttentionMetadata.contiguous([]), None), (AttentionMetadata.paged([], [], [], 4), cache)):
        with torch.no_grad():
            hidden = ours(none, none, md, kv)
        assert hidden.shape == (0, ours.config.hidden_size)
        assert ours.compute_logits(hidden).shape == (0, ours.config.vocab_size)
    assert not cache.any()


def test_attention_groups_by_context_length(reference: tuple[Any, Transformer]) -> None:
    """Very different context lengths prefill and decode in separate groups, with the same logits."""
    from raymoe.model.attention import AttentionPlan

    hf, ours = reference
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (2, 5, 11, 23, 24)]
    md = AttentionMetadata.paged([1] * 5, [len(p) for p in prompts], [[1]] * 5, 32)
    assert [len(x.tokens) for x in md.plan(32).d_groups] == [1, 1, 1, 2]  # 2 | 5 | 11 | 23, 24 (capped at 4)
    assert AttentionPlan._length_groups([0, 1], [7, 12]) == [[0, 1]]
    # prefill chunks group the same way: 4 | 10 | 22, 23 (the decode of sequence 0 aside)
    chunks = [len(p) - 1 for p in prompts]
    md = AttentionMetadata.paged(chunks, chunks, [[1]] * 5, 32)
    assert [g.tokens.shape for g in md.plan(32).p_groups] == [(1, 4), (1, 10), (2, 23)]
    # prefill all but the last token, then one decode step for everyone
    got = run_paged(ours, prompts, [[len(p) - 1 for p in prompts], [1] * 5])
    for p, logits in zip(prompts, got, strict=True):
        torch.testing.assert_close(logits[-1], hf_logits(hf, p)[-1], atol=1e-4, rtol=0)
