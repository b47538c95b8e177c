"""A 1 x 2 unit (EP2 with redundant slots, DP2, overlap on) and the engine's entry point `LLM(parallel=...)`."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from raymoe.engine.sampling_params import SamplingParams
from raymoe.llm import LLM
from raymoe.model.config import ModelConfig
from raymoe.model.deepseek_v3 import Transformer
from raymoe.model.tiny import default_checkpoint
from raymoe.model.weights import load_checkpoint
from raymoe.parallel.config import ParallelConfig
from raymoe.parallel.executor import ExpertParallelExecutor, UnitFailure
from raymoe.parallel.testing import check_against_reference, tiny_unit
from raymoe.parallel.topology import Topology
from tests.test_parallel import BLOCK, BLOCKS

PROMPTS = ["Hello there", "The quick brown fox jumps over", "a", "MoE on Ray: experts everywhere, attention in groups"]


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="attention_tp=3 must divide gpus_per_node=4"):
        ParallelConfig(nodes=2, gpus_per_node=4, attention_tp=3)
    with pytest.raises(ValueError, match="attention_dp=3 but 8 GPUs / attention_tp=2 = 4"):
        ParallelConfig(nodes=2, gpus_per_node=4, attention_tp=2, attention_dp=3)
    # the serving layer's unit spec is accepted as is
    ParallelConfig.model_validate(
        {"nodes": 2, "gpus_per_node": 4, "attention_tp": 2, "attention_dp": 4, "expert_parallel": 8,
         "redundant_experts": 8, "shared_expert_gpus": 0, "node_resource": None}
    )
    cfg = ModelConfig.from_checkpoint(default_checkpoint())
    with pytest.raises(ValueError, match="cannot hold 64 routed experts"):
        Topology.from_config(ParallelConfig(nodes=1, gpus_per_node=2, slots_per_gpu=8), cfg)
    topo = Topology.from_config(ParallelConfig(nodes=4, gpus_per_node=8, attention_tp=4, redundant_experts=32), cfg)
    assert (topo.dp_size, topo.world_size, topo.slots_per_gpu) == (8, 32, 3)


def test_unplaceable_unit_fails_clearly(ray_cluster) -> None:
    cfg = ParallelConfig(nodes=3, gpus_per_node=4, slots_per_gpu=6, placement_timeout_s=3)
    with pytest.raises(UnitFailure, match=r"3 node\(s\) with 4 free GPU\(s\) each are needed"):
        tiny_unit(cfg, kv_cache_tokens=4 * BLOCK, block_size=BLOCK)


def test_decode_layout_shared_expert_routed(ray_cluster) -> None:
    """V3's decode layout in small: the shared expert routed to every token, hosted with hot copies on 2 of 8 GPUs."""
    cfg = ParallelConfig(
        nodes=2, gpus_per_node=4, attention_tp=2, slots_per_gpu=11, shared_expert_gpus=2, node_limited=False,
        overlap=True,
    )
    unit = tiny_unit(cfg, kv_cache_tokens=BLOCKS * BLOCK, block_size=BLOCK)
    try:
        phy = unit.placement.phy2log  # [layers, 88]; logical 64 = the shared expert
        assert set(phy[:, :66].reshape(-1).tolist()) == set(range(64))  # 6 routed-expert GPUs hold all experts
        assert (phy[:, 66] == 64).all() and (unit.placement.replica_count[:, 64] == 1).all()
        model: Transformer = load_checkpoint(default_checkpoint(), progress=False)
        check_against_reference(unit, model, block_size=BLOCK, num_blocks=BLOCKS, steps=1)
        assert unit.last_stats.mean_gpu_tokens > 0
        load = unit.expert_load()  # the shared expert is the last column: every token routes to it once
        assert load.shape == (2, 65) and load[:, 64].min() > 0
        assert (load[:, :64].sum(axis=1) == 8 * load[:, 64]).all()
    finally:
        unit.shutdown()


@pytest.fixture(scope="module")
def unit_1x2(ray_cluster) -> Iterator[ExpertParallelExecutor]:
    cfg = ParallelConfig(nodes=1, gpus_per_node=2, redundant_experts=2, overlap=True)
    unit = tiny_unit(cfg, kv_cache_tokens=BLOCKS * BLOCK, block_size=BLOCK)
    yield unit
    unit.shutdown()


def test_unit_1x2_matches_single_process(unit_1x2: ExpertParallelExecutor) -> None:
    assert (unit_1x2.dp_size, unit_1x2.topo.slots_per_gpu) == (2, 33)
    model: Transformer = load_checkpoint(default_checkpoint(), progress=False)
    check_against_reference(unit_1x2, model, block_size=BLOCK, num_blocks=BLOCKS, steps=1)
    assert unit_1x2.last_stats.bytes_inter_node == 0  # one node: nothing crosses


def test_llm_parallel_same_as_single_process(unit_1x2: ExpertParallelExecutor) -> None:
    unit_1x2.shutdown()  # free its GPUs for the LLM's own unit
    params = SamplingParams(max_tokens=6, temperature=0.0)
    # logits processing crosses to the workers with the step's sampling metadata: one row each
    processed = [
        SamplingParams(max_tokens=6, temperature=0.0, repetition_penalty=50.0),
        SamplingParams(max_tokens=6, temperature=0.0, logit_bias={5: 100}),
        SamplingParams(max_tokens=6, temperature=0.0, frequency_penalty=2.0, presence_penalty=1.0),
        SamplingParams(max_tokens=6, temperature=0.0, logit_bias={1: 100}, min_tokens=3),
    ]
    ref = LLM(model=str(default_checkpoint()), kv_cache_tokens=512, block_size=BLOCK)
    want = [o.token_ids for o in ref.generate(PROMPTS, params)]
    want_processed = [o.token_ids for o in ref.generate(PROMPTS, processed)]
    ref.shutdown()
    assert want_processed[1] == [5] * 6 and len(want_processed[3]) == 4 and want_processed[3][-1] == 1
    llm = LLM(
        model=str(default_checkpoint()), kv_cache_tokens=512, block_size=BLOCK,
        parallel=ParallelConfig(nodes=1, gpus_per_node=2, overlap=True, replica_choice="static"),
    )
    try:
        assert llm.engine.dp_size == 2
        got = [o.token_ids for o in llm.generate(PROMPTS, params)]
        got_processed = [o.token_ids for o in llm.generate(PROMPTS, processed)]
        # disaggregation through the unit: prefill-only, KV out of one DP rank (read_kv), into another (write_kv)
        engine = llm.engine
        prompt = engine.tokenizer.encode(PROMPTS[1])
        engine.add_request("p", prompt, SamplingParams(max_tokens=1, temperature=0.0), prefill_only=True)
        while engine.has_unfinished_requests():
            engine.step()
        handoff = engine.export_kv("p")
        assert handoff.first_token_id == want[1][0] and handoff.kv.shape[1] == len(prompt)
        engine.add_request_with_kv("d", handoff, params)
        tokens: list[int] = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens += out.new_token_ids
    finally:
        llm.shutdown()
    assert got == want
    assert got_processed == want_processed
    assert [handoff.first_token_id, *tokens] == want[1]


def test_a_dropped_llm_releases_its_unit(ray_cluster) -> None:
    """Leaving `with LLM(...)` and dropping the last reference each give the unit's GPUs back: a unit
    taking 3 of node 0's 4 GPUs is built again after each, which could not be placed beside the first."""
    parallel = ParallelConfig(
        nodes=1, gpus_per_node=3, slots_per_gpu=22, node_resource="sim_node_0", placement_timeout_s=20
    )
    kwargs = {"model": str(default_checkpoint()), "kv_cache_tokens": 64, "block_size": BLOCK, "parallel": parallel}
    with LLM(**kwargs) as llm:
        (out,) = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        assert len(out.token_ids) == 1
    llm = LLM(**kwargs)  # placed only if the first unit is gone
    del llm
    gc.collect()
    LLM(**kwargs).shutdown()  # placed only if the second one was released when collected
