"""A small random DeepSeek-V3-shaped checkpoint in the published Hugging Face layout.

Everything the real checkpoint has, scaled down: MLA with a q LoRA rank, YaRN rope scaling as
published (factor 40 over 4096 positions), dense first layers then MoE layers with group-limited
routing (topk_group < n_group) and a shared expert, an MTP layer past `num_hidden_layers`,
sharded safetensors with an index, optional FP8 e4m3 weights with 128x128 `weight_scale_inv`
blocks, and a byte-level BPE tokenizer with DeepSeek's special tokens and chat template.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from raymoe.model.config import ModelConfig
from raymoe.model.deepseek_v3 import Transformer
from raymoe.model.weights import INDEX_FILE, checkpoint_name, quantize_fp8_block

# Bump when the default tiny checkpoint changes: a cached copy with another version is rebuilt.
TINY_VERSION = 3
MARKER_FILE = "raymoe_tiny.json"
FP8_BLOCK = (128, 128)

# DeepSeek-V3's config.json with the sizes scaled down (every structural key kept).
TINY_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 2048,  # the cap; make_tiny writes the trained BPE's size (~940)
    "hidden_size": 256,
    "intermediate_size": 576,  # 9 experts wide, as in V3 (18432 = 9 x 2048)
    "moe_intermediate_size": 64,  # hidden / 4 (V3: 7168 / 3.5)
    "num_hidden_layers": 4,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "n_shared_experts": 1,
    "n_routed_experts": 64,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 64,
    "q_lora_rank": 128,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "qk_nope_head_dim": 32,
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,  # top-8 from at most 4 of 8 groups, as in V3
    "first_k_dense_replace": 2,
    "moe_layer_freq": 1,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "use_cache": True,
    "torch_dtype": "bfloat16",
}

FP8_QUANTIZATION_CONFIG: dict[str, Any] = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": list(FP8_BLOCK),
}

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
# appended after the trained vocabulary, in DeepSeek-V3's order
ADDED_SPECIAL_TOKENS: tuple[str, ...] = (
    "<｜fim▁hole｜>",
    "<｜fim▁begin｜>",
    "<｜fim▁end｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<|EOT|>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
    "<｜tool▁sep｜>",
)

# DeepSeek-V3's chat template (tokenizer_config.json of the published checkpoint).
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name']"
    " + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json'"
    " + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"
)

# Training text for the tiny BPE (plain English, so common words become single tokens).
CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Hello! How are you today? I am fine, thank you. What is your name? My name is Ray, and I serve models.
Once upon a time there was a small town by the sea. Every morning the fishermen went out in their boats,
and every evening they came back with the day's catch. The children ran along the beach and the old men
sat in the shade, telling stories about storms and ships and the lights they had seen far out on the water.
Mixture-of-experts language models route each token to a few experts out of many. A gate scores the experts,
keeps the best groups, and picks the top experts inside them. The shared expert sees every token.
Attention compresses keys and values into a small latent vector, so the cache per token stays small.
Large models are served on many machines: attention runs in tensor-parallel groups, experts are spread over
every GPU, and hot experts get redundant copies so that no device waits for another.
The weather today is sunny with a light breeze from the west. Tomorrow there may be rain in the afternoon,
so take an umbrella if you go out. In the winter the days are short and the nights are long and cold.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 256 1024 2048 4096 65536. Dates like 2024-12-26 and times like 10:30.
Please write a short poem about the moon. The moon rises over the hills, silver and quiet, and the river
carries its light down to the sea. Can you explain how a computer works? A computer reads instructions from
memory, does arithmetic on numbers, and writes the results back. Programs are lists of such instructions.
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
import torch; x = torch.zeros(4, 8); y = x.sum(dim=-1)
Questions and answers: What is the capital of France? Paris. What is two plus two? Four.
Who wrote the play about the prince of Denmark? Shakespeare. Which planet is the largest? Jupiter.
She opened the door, looked at the garden, and smiled. The flowers were red, yellow, white and blue.
He said that the train would leave at nine, but it was late, and they waited on the platform for an hour.
We think, therefore we are; we read, therefore we learn; we write, therefore we remember.
"""


def tiny_config(fp8: bool = False, **overrides: Any) -> dict[str, Any]:
    """The config.json of a tiny checkpoint: TINY_CONFIG with overrides, validated."""
    unknown = [k for k in overrides if k not in TINY_CONFIG and k not in ModelConfig.model_fields]
    if unknown:
        raise ValueError(f"unknown config override {unknown[0]!r}")
    cfg = {**TINY_CONFIG, **overrides}
    if fp8:
        cfg["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    ModelConfig.from_dict(cfg, source="tiny config")
    return cfg


def _build_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(ADDED_SPECIAL_TOKENS),
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tok.add_special_tokens(list(ADDED_SPECIAL_TOKENS))
    # BOS first when special tokens are requested, as DeepSeek-V3's tokenizer.json does
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, 0)]
            ),
        ]
    )
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens, more than vocab_size={vocab_size}")
    return tok


def _special(content: str) -> dict[str, Any]:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def write_tokenizer(out: Path, tok: Any, model_max_length: int) -> None:
    """tokenizer.json (byte-level BPE) and tokenizer_config.json (DeepSeek-V3's special tokens and template)."""
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _special(BOS),
        "eos_token": _special(EOS),
        "pad_token": _special(PAD),
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": model_max_length,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizerFast",
        "use_default_system_prompt": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")


def _is_fp8_weight(name: str) -> bool:
    """The published checkpoint keeps FP8 for every projection inside the layers; the router gate,
    norms, embeddings and lm_head stay bf16."""
    return name.startswith("model.layers.") and name.endswith("_proj.weight") and ".shared_head." not in name


def _random_tensors(config: ModelConfig, seed: int, hot_experts: int = 0) -> dict[str, torch.Tensor]:
    """float32 tensors under their checkpoint names, the MTP layer(s) included. `hot_experts`: the
    first that many routed experts of every MoE layer get a gate bias that makes the router pick them
    for (nearly) every token: skewed load for expert-placement tests, the scores left as they are."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device="cpu")
    model.init_weights(std=0.02, generator=g)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name.endswith("e_score_correction_bias"):
            t = (torch.rand(t.shape, generator=g) - 0.5) * 0.04  # small, so it shifts selection but not scores
            t[:hot_experts] += 1.0  # sigmoid scores lie in (0, 1): +1 wins every selection
        tensors[checkpoint_name(name)] = t.detach().clone()
    # MTP module(s): one more decoder layer plus its projection and head, as published
    h, v = config.hidden_size, config.vocab_size
    for k in range(config.num_nextn_predict_layers):
        mtp = config.num_hidden_layers + k
        src = config.num_hidden_layers - 1  # a MoE layer, same shapes
        for name in [n for n in tensors if n.startswith(f"model.layers.{src}.")]:
            tensors[name.replace(f"model.layers.{src}.", f"model.layers.{mtp}.", 1)] = torch.randn(
                tensors[name].shape, generator=g
            ) * 0.02
        p = f"model.layers.{mtp}."
        tensors[p + "enorm.weight"] = torch.ones(h)
        tensors[p + "hnorm.weight"] = torch.ones(h)
        tensors[p + "eh_proj.weight"] = torch.randn(h, 2 * h, generator=g) * 0.02
        tensors[p + "embed_tokens.weight"] = torch.randn(v, h, generator=g) * 0.02
        tensors[p + "shared_head.norm.weight"] = torch.ones(h)
        tensors[p + "shared_head.head.weight"] = torch.randn(v, h, generator=g) * 0.02
    return tensors


def _sort_key(name: str) -> tuple[int, int, str]:
    """embed_tokens, layers in order, norm, lm_head: the order the published shards follow."""
    if name.startswith("model.layers."):
        return (1, int(name.split(".")[2]), name)
    if name.startswith("model.embed_tokens."):
        return (0, 0, name)
    return (2, 0, name)


def write_safetensors(
    out: Path,
    tensors: dict[str, torch.Tensor],
    *,
    fp8: bool,
    max_shard_bytes: int,
    progress: bool = True,
) -> dict[str, str]:
    """bf16 (or FP8 + scale) shards `model-0000i-of-0000n.safetensors` and the index; returns the weight map."""
    stored: list[tuple[str, torch.Tensor]] = []
    for name in sorted(tensors, key=_sort_key):
        t = tensors[name]
        if name.endswith("e_score_correction_bias"):
            stored.append((name, t.float().contiguous()))
        elif fp8 and _is_fp8_weight(name):
            q, scale_inv = quantize_fp8_block(t.to(torch.bfloat16), FP8_BLOCK)
            stored.append((name, q.contiguous()))
            stored.append((name + "_scale_inv", scale_inv.contiguous()))
        else:
            stored.append((name, t.to(torch.bfloat16).contiguous()))
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in stored:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes and not name.endswith("_scale_inv"):
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(tqdm(shards, desc=f"writing {out.name}", unit="shard", disable=not progress, leave=False)):
        file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(dict(shard), str(out / file), metadata={"format": "pt"})
        for name, t in shard:
            weight_map[name] = file
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def make_tiny(
    out_dir: str | Path,
    fp8: bool = False,
    seed: int = 0,
    *,
    max_shard_bytes: int = 4 << 20,
    tokenizer: bool = True,
    progress: bool = True,
    hot_experts: int = 0,
    **config_overrides: Any,
) -> Path:
    """Write a random DeepSeek-V3-shaped checkpoint to out_dir (created; existing files replaced).

    config_overrides change TINY_CONFIG keys (e.g. num_hidden_layers=3, n_routed_experts=16).
    `hot_experts`: that many routed experts (ids 0..n-1) win the routing of nearly every token
    (a gate bias), so live expert load is skewed the way a re-plan can fix.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a directory")
    cfg = tiny_config(fp8=fp8, **config_overrides)
    tok = _build_tokenizer(cfg["vocab_size"]) if tokenizer else None
    if tok is not None and "vocab_size" not in config_overrides:
        # the BPE learns fewer tokens than the cap from its small corpus: no id without a token
        cfg["vocab_size"] = tok.get_vocab_size()
    config = ModelConfig.from_dict(cfg, source="tiny config")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    if not 0 <= hot_experts <= config.num_experts_per_tok:
        raise ValueError(f"hot_experts: expected 0..{config.num_experts_per_tok} (experts per token), got {hot_experts}")
    tensors = _random_tensors(config, seed, hot_experts)
    write_safetensors(out, tensors, fp8=fp8, max_shard_bytes=max_shard_bytes, progress=progress)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    generation = {"_from_model_config": True, "bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tok is not None:
        write_tokenizer(out, tok, config.max_position_embeddings)
    marker = {"version": TINY_VERSION, "seed": seed, "fp8": fp8, "hot_experts": hot_experts, "overrides": config_overrides}
    (out / MARKER_FILE).write_text(json.dumps(marker, sort_keys=True) + "\n")
    for f in out.iterdir():  # safetensors writes owner-only files; a checkpoint is for reading
        f.chmod(0o644)
    return out


def _is_current(path: Path) -> bool:
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return marker.get("version") == TINY_VERSION and (path / INDEX_FILE).is_file()


def default_checkpoint() -> Path:
    """The embedded default model, generated on first use ($RAYMOE_CACHE or ~/.cache/raymoe).

    Concurrent first uses are safe: each process writes its own temporary directory and renames
    it into place; a loser of the race discards its copy and uses the winner's.
    """
    root = Path(os.environ.get("RAYMOE_CACHE") or Path.home() / ".cache" / "raymoe")
    path = root / "tiny-deepseek-v3"
    if _is_current(path):
        return path
    root.mkdir(parents=True, exist_ok=True)
    print(f"raymoe: generating the tiny default checkpoint in {path}", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-deepseek-v3-", dir=root))
    try:
        make_tiny(tmp, fp8=False, seed=0)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        if path.exists() and not _is_current(path):  # an older version: move it aside, then drop it
            stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=root))
            try:
                path.rename(stale / "old")
            except OSError:
                pass
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(path)
        except OSError:
            if not _is_current(path):  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
