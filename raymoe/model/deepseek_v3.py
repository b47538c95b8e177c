"""DeepSeek-V3 in plain PyTorch: MLA attention over a paged latent cache, MoE with group-limited routing.

Module names mirror the Hugging Face checkpoint (strip the leading `model.`), so loading is a
direct name map. No distribution in here: the expert-parallel runtime drives `MoE.route` and
`MoE.expert_forward` itself and puts dispatch/combine in between.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.model.attention import AttentionMetadata, AttentionPlan, DecodeGroup, PrefillGroup
from raymoe.model.config import ModelConfig

ExpertSubset = Iterable[int] | Mapping[int, Iterable[int]] | None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (self.dim,), self.weight, self.eps)
        # normalise in float32, scale in the model dtype (as the reference does)
        return self.weight * F.rms_norm(x.float(), (self.dim,), None, self.eps).to(x.dtype)


def fused_weight(owner: nn.Module, names: tuple[str, ...]) -> torch.Tensor:
    """Row-stacked weights of bias-free Linears that read the same input: one matmul, not several.

    Built on first use; the Linears' weights then become contiguous views into it (no second
    copy, in-place updates seen by both). Rebuilt when a weight is replaced or the model moved.
    """
    linears = [owner._modules[n] for n in names]
    params = [lin._parameters["weight"] for lin in linears]
    cached = owner.__dict__.get("_fused_weight")
    if (
        cached is not None
        and all(a is b for a, b in zip(cached[1], params, strict=True))
        and params[0].data_ptr() == cached[0].data_ptr()
    ):
        return cached[0]
    # normal tensors even under inference_mode: the parameters must stay updatable in place
    with torch.inference_mode(False), torch.no_grad():
        w = torch.cat(params)
        start = 0
        for lin, p in zip(linears, params, strict=True):
            lin.weight = nn.Parameter(w[start : start + p.shape[0]], requires_grad=False)
            start += p.shape[0]
    owner.__dict__["_fused_weight"] = (w, [lin._parameters["weight"] for lin in linears])
    return w


def yarn_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Rope inverse frequencies over qk_rope_head_dim (YaRN-corrected when configured) and the cos/sin scale."""
    dim = config.qk_rope_head_dim
    base = config.rope_theta
    # explicit device: the loader builds the model under torch.device("meta")
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    rs = config.rope_scaling
    if rs is None:
        return 1.0 / pos_freqs, 1.0
    original = config.original_max_position_embeddings
    factor = rs.factor if rs.factor is not None else config.max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rs.attention_factor is not None:
        attention_factor = rs.attention_factor
    elif rs.mscale and rs.mscale_all_dim:
        attention_factor = mscale(factor, rs.mscale) / mscale(factor, rs.mscale_all_dim)
    else:
        attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate pairs (x0,x1),(x2,x3).. when interleaved (DeepSeek's layout), else (x_i, x_{i+d/2}).

    The result lists the rotated pairs interleaved whatever the input layout; queries and keys
    share it, so their dot products are those of the reference.
    """
    if x.numel() == 0:
        return x.new_empty(x.shape)
    *lead, d = x.shape
    xf = x.float()
    if interleave:
        pairs = xf.reshape(*lead, d // 2, 2)
    else:
        pairs = xf.reshape(*lead, 2, d // 2).transpose(-1, -2)
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(st % 2 for st in pairs.stride()[:-1]):
        pairs = pairs.contiguous()
    out = torch.view_as_real(torch.view_as_complex(pairs) * freqs_cis).flatten(-2)
    return out.to(x.dtype)


@dataclass
class ForwardContext:
    """What every layer needs for one step: the attention plan, rope tables, cache slots."""

    plan: AttentionPlan
    freqs_cis: torch.Tensor  # [T, rope_dim/2] complex64: rope_scale * exp(i * position * inv_freq)
    slot_mapping: torch.Tensor | None


class MLA(nn.Module):
    """Multi-head latent attention. Decode: absorbed form over the latent cache; prefill: expanded form."""

    # prefill attention materialises its scores up to this many elements (64 MiB in float32),
    # beyond that SDPA's memory-bounded kernel takes over
    PREFILL_SCORES_MAX = 16 << 20
    # scores computed per chunk of sequences: about this many elements (1 MiB float32, cache-sized)
    PREFILL_SCORES_CHUNK = 1 << 18

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = h = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        self.interleave = config.rope_interleave
        self.softmax_scale = config.softmax_scale
        dim = config.hidden_size
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(dim, h * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, h * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, h * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, kv_cache: torch.Tensor | None) -> torch.Tensor:
        T = x.shape[0]
        h, dn, dr, r = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        if self.q_lora_rank is None:
            q = self.q_proj(x)
            kv_a = self.kv_a_proj_with_mqa(x)
        else:
            # q_a_proj and kv_a_proj_with_mqa read the same x: one matmul
            q_a, kv_a = F.linear(x, fused_weight(self, ("q_a_proj", "kv_a_proj_with_mqa"))).split(
                [self.q_lora_rank, r + dr], dim=-1
            )
            q = self.q_b_proj(self.q_a_layernorm(q_a))
        q = q.view(T, h, self.qk_head_dim)
        q_nope, q_pe = torch.split(q, [dn, dr], dim=-1)
        q_pe = apply_rope(q_pe, ctx.freqs_cis.unsqueeze(1), self.interleave)
        c_kv, k_pe = torch.split(kv_a, [r, dr], dim=-1)
        latent = torch.cat((self.kv_a_layernorm(c_kv), apply_rope(k_pe, ctx.freqs_cis, self.interleave)), dim=-1)
        if kv_cache is None:
            source = latent
        else:
            source = kv_cache.view(-1, r + dr)
            assert ctx.slot_mapping is not None
            source.index_copy_(0, ctx.slot_mapping, latent.to(source.dtype))
        plan = ctx.plan
        if T == 0:  # an idle rank's empty step
            out = x.new_zeros(0, h * self.v_head_dim)
        elif len(plan.d_groups) == 1 and plan.d_groups[0].tokens is None:  # all decode, alike
            out = self._decode(q_nope, q_pe, source, plan, plan.d_groups[0])
        else:
            out = x.new_empty(T, h * self.v_head_dim)
            for g in plan.d_groups:
                out[g.tokens] = self._decode(q_nope[g.tokens], q_pe[g.tokens], source, plan, g)
            for pg in plan.p_groups:
                self._prefill(q_nope, q_pe, source, plan, pg, out)
        return self.o_proj(out)

    def _decode(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, source: torch.Tensor, plan: AttentionPlan, group: DecodeGroup
    ) -> torch.Tensor:
        """One query per sequence: absorb W_UK into q, attend over the latents, project out through W_UV.

        All heads of a sequence share one latent key/value row set, so scores are one batched
        matmul per step ([S, H, r+dr] x [S, r+dr, L]), not a per-head expansion.
        """
        s = q_nope.shape[0]
        h, dn, r = self.num_heads, self.qk_nope_head_dim, self.kv_lora_rank
        w = self.kv_b_proj.weight.view(h, dn + self.v_head_dim, r)
        q_lat = torch.bmm(q_nope.transpose(0, 1), w[:, :dn]).transpose(0, 1)  # [S, H, r]
        q_full = torch.cat((q_lat, q_pe.to(q_lat.dtype)), dim=-1)  # [S, H, r+dr]
        kv = plan.gather(source, group.gather).to(q_full.dtype)  # [S, L, r+dr]
        scores = torch.baddbmm(
            group.bias_as(q_full.dtype), q_full, kv.transpose(1, 2), alpha=self.softmax_scale
        )  # [S, H, L]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_full.dtype)
        # over the whole latent row, then sliced: a contiguous operand is ~2x faster than kv[..., :r]
        o = torch.bmm(probs, kv)[..., :r]  # [S, H, r]
        o = torch.bmm(o.transpose(0, 1), w[:, dn:].transpose(1, 2))  # [H, S, dv]
        return o.transpose(0, 1).reshape(s, h * self.v_head_dim)

    def _prefill(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        source: torch.Tensor,
        plan: AttentionPlan,
        group: PrefillGroup,
        out: torch.Tensor,
    ) -> None:
        """Several queries per sequence: expand the latents to per-head keys/values, causal with cached offset."""
        h, dn, dr, r, dv = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank, self.v_head_dim
        kv = plan.gather(source, group.gather).to(q_nope.dtype)  # [Sp, Lp, r+dr]
        sp, lp = kv.shape[:2]
        qp = group.tokens.shape[1]
        kvb = self.kv_b_proj(kv[..., :r]).view(sp, lp, h, dn + dv)
        # q and k built head-major ([Sp, H, len, dqk]) in one copy each, so the score matmuls
        # take them as they are instead of copying them again
        k = kv.new_empty(sp, h, lp, dn + dr)
        k[..., :dn] = kvb[..., :dn].transpose(1, 2)
        k[..., dn:] = kv[..., r:].unsqueeze(1)  # the rope key is shared by every head
        v = kvb[..., dn:].transpose(1, 2)
        q = torch.cat((q_nope, q_pe), dim=-1)
        if not group.whole:
            q = q.index_select(0, group.tokens.reshape(-1))
        q = q.view(sp, qp, h, dn + dr).transpose(1, 2).contiguous()
        if h * qp * lp <= self.PREFILL_SCORES_MAX:
            # plain matmuls beat SDPA's masked CPU path; a few sequences at a time, so the scores
            # (matmul, scale, mask, softmax, matmul) stay in cache instead of streaming through DRAM
            step = max(1, min(sp, self.PREFILL_SCORES_CHUNK // (h * qp * lp)))
            bias = group.bias_as(q.dtype)
            chunks = []
            for a in range(0, sp, step):
                scores = torch.matmul(q[a : a + step], k[a : a + step].transpose(-1, -2))
                scores.mul_(self.softmax_scale).add_(bias[a : a + step])
                probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
                chunks.append(torch.matmul(probs, v[a : a + step]))
            o = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=group.mask, scale=self.softmax_scale)
        # o: [Sp, H, Qp, dv]
        o = o.transpose(1, 2).reshape(sp * qp, h * dv)
        if group.whole:
            out.copy_(o)
        else:
            out[group.tokens_valid] = o[group.valid_flat]


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers, each routed expert and the shared experts."""

    def __init__(self, dim: int, inter_dim: int, fuse: bool = True) -> None:
        super().__init__()
        self.inter_dim = inter_dim
        self.fuse = fuse  # routed experts run from their MoE's stacked weights instead
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    # rows per chunk for large (prefill) inputs: the [rows, 2 * inter_dim] activations stay
    # cache-sized and reuse freed memory instead of faulting in fresh pages every layer
    CHUNK_ROWS = 1024

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fuse:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        w13, i = fused_weight(self, ("gate_proj", "up_proj")), self.inter_dim
        if x.dim() == 2 and x.shape[0] > self.CHUNK_ROWS:
            c = self.CHUNK_ROWS
            out = x.new_empty(x.shape[0], self.down_proj.out_features)
            for a in range(0, x.shape[0], c):
                h = F.linear(x[a : a + c], w13)
                torch.mm(F.silu(h[:, :i]).mul_(h[:, i:]), self.down_proj.weight.t(), out=out[a : a + c])
            return out
        h = F.linear(x, w13)
        return self.down_proj(F.silu(h[..., :i]).mul_(h[..., i:]))


class Gate(nn.Module):
    """Sigmoid scores; the correction bias steers selection only; group-limited top-k."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.route_scale = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        if self.topk_group < self.n_group:
            t = x.shape[0]
            grouped = choice.view(t, self.n_group, self.n_experts // self.n_group)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
            drop = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(drop.unsqueeze(-1), float("-inf")).view(t, self.n_experts)
        ids = choice.topk(self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * self.route_scale


_weight_of = operator.methodcaller("get", "weight")

# bumped whenever any module registers or replaces a parameter: an expert stack re-checks its
# parameters' identities only when one may have been swapped, not on every MoE call
_param_epoch = 0


def _count_param_registration(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    global _param_epoch
    _param_epoch += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_param_registration)


@dataclass
class ExpertStack:
    """The hosted experts' weights as batched tensors: w13 [R, D, 2I] (gate columns then up columns), w2 [R, I, D].

    Input-major (x @ w, the Linears' weights transposed): a few-row matmul streams the weight rows
    in order, ~15% faster on a CPU core than the [out, in] layout at decode sizes.

    row[e] is expert e's row in the stack (-1: not hosted); a row no expert holds is free
    (`MoE.stack_rows`, `MoE.replace_experts`). It remembers the modules and parameters it was
    built from, so a swapped or moved expert is noticed and the stack rebuilt.
    """

    modules: tuple[nn.Module | None, ...]
    params: list[tuple[nn.Module, nn.Parameter]]
    w13: torch.Tensor
    w2: torch.Tensor
    row: torch.Tensor
    all_hosted: bool

    def __post_init__(self) -> None:
        # the checks below run every MoE call: kept to C-level iteration (map), not Python loops
        self._param_dicts = [lin._parameters for lin, _ in self.params]
        self._param_objs = [p for _, p in self.params]
        self._checked_epoch = -1
        # where the first expert's gate and down weights are now: .to() moves them, and the stack is rebuilt
        self._ptrs = (self.params[0][1].data_ptr(), self.params[2][1].data_ptr()) if self.params else None

    def valid_for(self, experts: nn.ModuleList) -> bool:
        """Same expert modules, same parameter objects, still views of this stack (not moved by .to())."""
        mods = tuple(experts._modules.values())
        if len(mods) != len(self.modules) or not all(map(operator.is_, mods, self.modules)):
            return False
        if self._checked_epoch != _param_epoch:
            if not all(map(operator.is_, map(_weight_of, self._param_dicts), self._param_objs)):
                return False
            self._checked_epoch = _param_epoch
        if self._ptrs is None:  # only free rows: nothing of the model points into them
            return True
        return (self.params[0][1].data_ptr(), self.params[2][1].data_ptr()) == self._ptrs


def _view_row(m: MLP, w13: torch.Tensor, w2: torch.Tensor, r: int) -> None:
    """Point an expert's parameters at row r of the stack (no copy: an update through either is seen by both)."""
    inter = w2.shape[1]
    m.gate_proj.weight = nn.Parameter(w13[r, :, :inter].t(), requires_grad=False)
    m.up_proj.weight = nn.Parameter(w13[r, :, inter:].t(), requires_grad=False)
    m.down_proj.weight = nn.Parameter(w2[r].t(), requires_grad=False)


class MoE(nn.Module):
    """Routed experts (entries None where this process does not host them) plus shared experts."""

    # Padding rows each expert with tokens may add before one batched matmul over all hosted experts
    # costs more than a matmul pair per expert (a call costs about as much as 16 rows on a CPU core).
    PAD_ROWS_PER_EXPERT = 16
    # grouped-GEMM path: tokens per chunk for large (prefill) batches
    CHUNK_TOKENS = 1024

    def __init__(self, config: ModelConfig, hosted: Iterable[int] | None = None) -> None:
        super().__init__()
        self.n_routed_experts = config.n_routed_experts
        self.moe_intermediate_size = config.moe_intermediate_size
        self.gate = Gate(config)
        keep = set(range(config.n_routed_experts)) if hosted is None else set(hosted)
        bad = [e for e in keep if not 0 <= e < config.n_routed_experts]
        if bad:
            raise ValueError(f"expert ids {sorted(bad)} out of range [0, {config.n_routed_experts})")
        self.experts = nn.ModuleList(
            [
                MLP(config.hidden_size, config.moe_intermediate_size, fuse=False) if e in keep else None
                for e in range(config.n_routed_experts)
            ]
        )
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
        self._stack: ExpertStack | None = None
        # rows the expert stack has at least: free rows let `replace_experts` host more experts than it was
        # built with (the expert-parallel runtime sets its slots per GPU)
        self.stack_rows = 0
        # called with each routing result ([T, top_k] ids): the single-process runner counts expert load with it
        self.route_observer: Callable[[torch.Tensor], None] | None = None

    @property
    def hosted_experts(self) -> list[int]:
        return [e for e, m in enumerate(self.experts) if m is not None]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, top_k] logical expert ids (int64) and their float32 weights (scaled)."""
        ids, weights = self.gate(x)
        if self.route_observer is not None:
            self.route_observer(ids)
        return ids, weights

    def expert_stack(self) -> ExpertStack | None:
        """Batched weights of the hosted experts (None when none is hosted), built on first use.

        The experts' own parameters are then re-pointed to views of the stack: no second copy, and
        an in-place update through either name (e.g. loading a migrated expert) is seen by both.
        Assigning a new module or parameter, or moving the model (.to()), rebuilds the stack.
        """
        st = self._stack
        like = self.gate.weight if st is None or not st.params else None  # the model's device and dtype
        if st is not None and st.valid_for(self.experts):
            # a stack of free rows only: no parameter points into it, so check it is still where the model is
            if like is None or (st.w13.device, st.w13.dtype) == (like.device, like.dtype):
                return st
        like = self.gate.weight
        hosted = [(e, m) for e, m in enumerate(self.experts) if m is not None]
        rows = max(len(hosted), self.stack_rows)
        if not rows:
            self._stack = None
            return None
        # normal tensors even under inference_mode: the parameters must stay updatable in place
        with torch.inference_mode(False), torch.no_grad():
            dim, inter = like.shape[1], self.moe_intermediate_size
            w13 = torch.zeros((rows, dim, 2 * inter), dtype=like.dtype, device=like.device)
            w2 = torch.zeros((rows, inter, dim), dtype=like.dtype, device=like.device)
            for i, (_, m) in enumerate(hosted):
                w13[i].copy_(torch.cat((m.gate_proj.weight, m.up_proj.weight)).t())
                w2[i].copy_(m.down_proj.weight.t())
                _view_row(m, w13, w2, i)
            row = torch.full((self.n_routed_experts,), -1, dtype=torch.long, device=w13.device)
            row[torch.tensor([e for e, _ in hosted], dtype=torch.long, device=w13.device)] = torch.arange(
                len(hosted), device=w13.device
            )
        return self._restack(w13, w2, row)

    def _restack(self, w13: torch.Tensor, w2: torch.Tensor, row: torch.Tensor) -> ExpertStack:
        """The stack's bookkeeping (modules, parameters) over weights already in place."""
        hosted = [m for m in self.experts if m is not None]
        params = [(lin, lin.weight) for m in hosted for lin in (m.gate_proj, m.up_proj, m.down_proj)]
        modules = tuple(self.experts._modules.values())
        self._stack = ExpertStack(modules, params, w13, w2, row, len(hosted) == self.n_routed_experts)
        return self._stack

    def replace_experts(self, add: Mapping[int, tuple[torch.Tensor, torch.Tensor]], drop: Iterable[int]) -> None:
        """Stop hosting `drop` and host `add` ({expert: (w13 [D, 2I], w2 [I, D]), the stack's layout}) in the
        rows that frees and the free rows, copied in place: the stack keeps its storage (no rebuild).

        How the expert-parallel runtime commits a migration. The module of a freed row serves the
        expert that takes the row; its parameters stay views of the stack.
        """
        st = self.expert_stack()
        drop = sorted(set(drop))
        if st is None:
            raise ValueError("replace_experts: this MoE layer hosts no expert (no stack to copy into)")
        hosted = set(self.hosted_experts)
        stray = [e for e in drop if e not in hosted] + [e for e in add if not 0 <= e < self.n_routed_experts]
        if stray:
            raise ValueError(f"replace_experts: expert(s) {stray} not hosted or out of range")
        again = sorted(set(add) & (hosted - set(drop)))
        if again:
            raise ValueError(f"replace_experts: expert(s) {again} already hosted")
        rows = st.row.tolist()
        owner = {rows[e]: self.experts[e] for e in drop}  # freed row -> the module that views it
        taken = {r for r in rows if r >= 0}
        free = sorted(owner) + [r for r in range(st.w13.shape[0]) if r not in taken]
        if len(add) > len(free):
            raise ValueError(
                f"replace_experts: {len(add)} experts to add, {len(free)} free rows in a stack of {st.w13.shape[0]} "
                "(set stack_rows before the stack is built)"
            )
        for e in drop:
            self.experts[e] = None
            rows[e] = -1
        with torch.inference_mode(False), torch.no_grad():
            for (e, (w13, w2)), r in zip(sorted(add.items()), free, strict=False):
                st.w13[r].copy_(w13)
                st.w2[r].copy_(w2)
                m = owner.get(r)
                if m is None:
                    with torch.device("meta"):
                        m = MLP(st.w2.shape[2], self.moe_intermediate_size, fuse=False)
                    _view_row(m, st.w13, st.w2, r)
                self.experts[e] = m
                rows[e] = r
            st.row.copy_(torch.tensor(rows, dtype=torch.long))
        self._restack(st.w13, st.w2, st.row)

    # None: decide per call (see use_grouped_mm); tests force one path or the other
    GROUPED_MM: bool | None = None

    def use_grouped_mm(self, x: torch.Tensor) -> bool:
        """torch's grouped GEMM on a single-threaded CPU: there it beats the per-expert matmul pairs
        (no per-expert calls), while with more threads the batched forms parallelise better."""
        if self.GROUPED_MM is not None:
            return self.GROUPED_MM
        return hasattr(torch, "_grouped_mm") and x.device.type == "cpu" and torch.get_num_threads() == 1

    def prefer_padded(self, x: torch.Tensor) -> bool:
        """Whether the padded batched matmul goes before the grouped GEMM when both may run.

        On a CPU the grouped GEMM runs a matmul per group: in float32 that is as fast as the padded
        batched matmul at decode sizes, in bfloat16 2.5-3.5x slower (16-64 tokens, top-8 of 64
        experts: 3.8-5.4 ms against 1.5-1.7 ms per layer; benchmarks/bench_moe_paths.py)."""
        if self.GROUPED_MM is not None:
            return not self.GROUPED_MM
        return x.dtype != torch.float32

    def expert_forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the routed experts' outputs; assignments grouped per expert.

        Small batches (decode) run all experts as two batched matmuls over per-expert padded rows
        (DeepGEMM's masked layout) once most experts have tokens; otherwise a single-threaded CPU
        runs two grouped GEMMs over the exact rows, and anything else one matmul pair per expert
        that has tokens. In float32 the grouped GEMM goes first on one thread (`prefer_padded`). Experts not hosted here
        contribute nothing, so a caller can sum partial results across hosts.
        """
        t, k = ids.shape
        ids, weights = ids.to(x.device), weights.to(x.device)  # a dispatcher may hand them over on the host
        st = self.expert_stack()
        if t == 0 or st is None:
            return torch.zeros_like(x)
        if t > self.CHUNK_TOKENS and self.use_grouped_mm(x):
            # a prefill's tokens a chunk at a time: the gathered rows and activations stay
            # cache-sized and reuse freed memory instead of faulting in fresh pages every layer
            c = self.CHUNK_TOKENS
            return torch.cat(
                [self.expert_forward(x[a : a + c], ids[a : a + c], weights[a : a + c]) for a in range(0, t, c)]
            )
        out = torch.zeros_like(x)
        lo, hi = torch.aminmax(ids)
        if int(lo) < 0 or int(hi) >= self.n_routed_experts:
            raise ValueError(f"expert ids must be in [0, {self.n_routed_experts})")
        rows = st.row[ids.reshape(-1)]
        token = torch.arange(t, device=x.device).repeat_interleave(k)
        w = weights.reshape(-1)
        if not st.all_hosted:
            mine = rows >= 0
            rows, token, w = rows[mine], token[mine], w[mine]
            if rows.numel() == 0:
                return out
        rows, order = torch.sort(rows, stable=True)
        token, w = token[order], w[order].to(x.dtype)
        n_rows = st.w13.shape[0]
        counts = torch.bincount(rows, minlength=n_rows)
        inter = self.moe_intermediate_size
        grouped = self.use_grouped_mm(x)
        padded = False
        if not grouped or self.prefer_padded(x):
            counts_list = counts.tolist()
            width = max(counts_list)
            active = sum(1 for c in counts_list if c)
            # the batched form reads every hosted expert's weights: worth it once most of them have tokens
            padded = 2 * active >= n_rows and n_rows * width - rows.numel() <= self.PAD_ROWS_PER_EXPERT * active
        if grouped and not padded:
            # exact rows, one grouped GEMM per projection: no padding FLOPs, no per-expert calls
            offs = torch.cumsum(counts, 0).to(torch.int32)
            h = torch._grouped_mm(x.index_select(0, token), st.w13, offs=offs)
            ys = torch._grouped_mm(F.silu(h[:, :inter]).mul_(h[:, inter:]), st.w2, offs=offs)
            return out.index_add_(0, token, ys.mul_(w.unsqueeze(1)))
        if padded:
            starts = torch.cumsum(counts, 0) - counts
            # flat position of each assignment in the padded [n_rows, width] grid
            cell = rows * width + torch.arange(rows.numel(), device=x.device) - starts[rows]
            xb = x.new_zeros(n_rows * width, x.shape[1]).index_copy_(0, cell, x.index_select(0, token))
            h = torch.bmm(xb.view(n_rows, width, -1), st.w13)
            h = F.silu(h[..., :inter]) * h[..., inter:]
            ys = torch.bmm(h, st.w2).view(n_rows * width, -1).index_select(0, cell)
        else:
            xs = x.index_select(0, token)
            ys = torch.empty_like(xs)
            start = 0
            for r, n in enumerate(counts_list):
                if n:
                    h = torch.mm(xs[start : start + n], st.w13[r])
                    ys[start : start + n] = torch.mm(F.silu(h[:, :inter]) * h[:, inter:], st.w2[r])
                    start += n
        return out.index_add_(0, token, ys * w.unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.route(x)
        return self.expert_forward(x, ids, weights) + self.shared_experts(x)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, hosted: Iterable[int] | None = None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.self_attn = MLA(config)
        self.mlp: nn.Module
        if config.is_moe_layer(layer_id):
            self.mlp = MoE(config, hosted)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, kv_cache: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def hosted_for_layer(experts: ExpertSubset, layer: int) -> Iterable[int] | None:
    """`experts` is None (all), one id set for every MoE layer, or a per-layer mapping."""
    if experts is None:
        return None
    if isinstance(experts, Mapping):
        return experts.get(layer, ())
    return experts


class Transformer(nn.Module):
    """The decoder stack. `forward` returns the final-normed hidden states of the new tokens."""

    def __init__(self, config: ModelConfig, experts: ExpertSubset = None) -> None:
        super().__init__()
        self.config = config
        if isinstance(experts, Mapping):
            stray = sorted(k for k in experts if not (0 <= k < config.num_hidden_layers and config.is_moe_layer(k)))
            if stray:
                raise ValueError(f"experts: layer {stray[0]} is not a MoE layer (MoE layers: {config.moe_layers})")
        elif experts is not None:
            experts = sorted(set(experts))
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [Block(config, i, hosted_for_layer(experts, i)) for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        inv_freq, self.rope_scale = yarn_inv_freq(config)
        self._inv_freq = inv_freq  # kept float32, out of the state dict and of .to(dtype)
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init (normal(0, std) matrices, unit norms, zero gate bias) for tests and tiny checkpoints."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, int, int, int]:
        return (self.config.num_hidden_layers, num_blocks, block_size, self.config.kv_cache_dim)

    def rope(self, positions: torch.Tensor) -> torch.Tensor:
        """[T, rope_dim/2] complex64 rotations, scaled by YaRN's attention factor (computed in float32)."""
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        angles = positions.to(torch.float32).unsqueeze(1) * self._inv_freq
        return torch.polar(torch.full_like(angles, self.rope_scale), angles)

    def make_context(
        self, positions: torch.Tensor, attn: AttentionMetadata, kv_cache: torch.Tensor | None
    ) -> ForwardContext:
        if kv_cache is not None:
            c = self.config
            if kv_cache.dim() != 4 or kv_cache.shape[0] != c.num_hidden_layers or kv_cache.shape[3] != c.kv_cache_dim:
                raise ValueError(
                    f"kv_cache shape {tuple(kv_cache.shape)} does not match "
                    f"[{c.num_hidden_layers}, num_blocks, block_size, {c.kv_cache_dim}]"
                )
            if attn.slot_mapping is None:
                raise ValueError("AttentionMetadata.slot_mapping is required with a KV cache")
        plan = attn.plan(kv_cache.shape[2] if kv_cache is not None else None)
        if positions.shape[0] != plan.num_tokens:
            raise ValueError(f"{positions.shape[0]} positions for {plan.num_tokens} tokens in the attention metadata")
        return ForwardContext(plan, self.rope(positions), attn.slot_mapping)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv_cache: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ctx = self.make_context(positions, attn, kv_cache)
        h = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, ctx, None if kv_cache is None else kv_cache[i])
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
