"""Load the published Hugging Face DeepSeek-V3 layout into `Transformer`.

Sharded safetensors (`model.safetensors.index.json`) or one `model.safetensors`; FP8 e4m3 weights
with `weight_scale_inv` block scales are dequantised on load; MTP layers (index >=
num_hidden_layers) are skipped; routed experts outside the requested subset are never read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from raymoe.model.config import ModelConfig
from raymoe.model.deepseek_v3 import ExpertSubset, Transformer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"

# safetensors dtype strings the loader accepts
_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
}


class CheckpointReader:
    """Tensor access to a checkpoint directory; one open handle per shard; records every tensor read."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from e
            self.weight_map: dict[str, str] = dict(weight_map)
        elif (self.path / SINGLE_FILE).is_file():
            with safe_open(self.path / SINGLE_FILE, framework="pt") as f:
                self.weight_map = {name: SINGLE_FILE for name in f.keys()}  # noqa: SIM118
        else:
            raise ValueError(f"{self.path}: no {INDEX_FILE} or {SINGLE_FILE}")
        for shard in sorted(set(self.weight_map.values())):
            if not (self.path / shard).is_file():
                raise ValueError(f"{self.path}: shard {shard!r} listed in {INDEX_FILE} does not exist")
        self._handles: dict[str, Any] = {}
        self.read_names: list[str] = []

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _handle(self, name: str) -> Any:
        shard = self.weight_map[name]
        h = self._handles.get(shard)
        if h is None:
            h = safe_open(self.path / shard, framework="pt", device="cpu")
            self._handles[shard] = h
        return h

    def dtype_and_shape(self, name: str) -> tuple[str, list[int]]:
        sl = self._handle(name).get_slice(name)
        return sl.get_dtype(), list(sl.get_shape())

    def get(self, name: str) -> torch.Tensor:
        self.read_names.append(name)
        return self._handle(name).get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 weight = fp8 value x the scale of its (block_rows x block_cols) tile; edge tiles are partial."""
    rows, cols = weight.shape
    br, bc = block
    s = scale_inv.float().repeat_interleave(br, dim=0)[:rows].repeat_interleave(bc, dim=1)[:, :cols]
    return weight.float() * s


def quantize_fp8_block(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-scaled e4m3 quantisation as in DeepSeek's published weights: (fp8 weight, float32 scale_inv)."""
    rows, cols = weight.shape
    br, bc = block
    nr, nc = math.ceil(rows / br), math.ceil(cols / bc)
    w = weight.float()
    padded = torch.zeros(nr * br, nc * bc)
    padded[:rows, :cols] = w
    tiles = padded.view(nr, br, nc, bc)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / torch.finfo(torch.float8_e4m3fn).max
    q = (tiles / scale_inv.view(nr, 1, nc, 1)).view(nr * br, nc * bc)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale_inv.to(torch.float32)


def checkpoint_name(param: str) -> str:
    """Our parameter name -> the checkpoint's (`lm_head` sits outside `model.`)."""
    return param if param.startswith("lm_head.") else "model." + param


def _block_size(config: ModelConfig) -> tuple[int, int]:
    qc = config.quantization_config or {}
    block = qc.get("weight_block_size", [128, 128])
    if not (isinstance(block, list | tuple) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"config.json: quantization_config.weight_block_size {block!r} is not [rows, cols]")
    return int(block[0]), int(block[1])


def read_tensor(
    reader: CheckpointReader,
    name: str,
    expected_shape: tuple[int, ...],
    block: tuple[int, int],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """One checkpoint tensor on `device`, checked and dequantised there (float32 if it was FP8, its
    own dtype otherwise): FP8 bytes cross to an accelerator, not their float32 expansion."""
    if name not in reader:
        raise ValueError(f"{reader.path}: checkpoint is missing tensor {name!r}")
    dtype, shape = reader.dtype_and_shape(name)
    if dtype not in _DTYPES:
        raise ValueError(f"{reader.path}: tensor {name!r} has unsupported dtype {dtype} (expected one of {list(_DTYPES)})")
    if tuple(shape) != tuple(expected_shape):
        raise ValueError(f"{reader.path}: tensor {name!r} has shape {tuple(shape)}, expected {tuple(expected_shape)}")
    t = reader.get(name).to(device)
    if _DTYPES[dtype] == torch.float8_e4m3fn:
        scale_name = name + SCALE_SUFFIX
        if scale_name not in reader:
            raise ValueError(f"{reader.path}: FP8 tensor {name!r} has no {scale_name!r}")
        want = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])) if len(shape) == 2 else None
        sdtype, sshape = reader.dtype_and_shape(scale_name)
        if want is None or tuple(sshape) != want:
            raise ValueError(f"{reader.path}: tensor {scale_name!r} has shape {tuple(sshape)}, expected {want}")
        if sdtype not in _DTYPES or _DTYPES[sdtype] == torch.float8_e4m3fn:
            raise ValueError(f"{reader.path}: tensor {scale_name!r} has unsupported dtype {sdtype}")
        t = dequantize_fp8_block(t, reader.get(scale_name).to(device), block)
    return t


_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[dtype]


def load_checkpoint(
    path: str | Path,
    config: ModelConfig | None = None,
    *,
    experts: ExpertSubset = None,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    reader: CheckpointReader | None = None,
    progress: bool = True,
) -> Transformer:
    """Build a `Transformer` from a checkpoint directory, reading only the tensors it hosts.

    experts: None (all routed experts), ids for every MoE layer, or {layer: ids}.
    reader: pass one to inspect afterwards which tensors were read (`reader.read_names`).
    Tensors the model does not have (the MTP layers past num_hidden_layers) are never read.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: not a checkpoint directory")
    config = config or ModelConfig.from_checkpoint(path)
    dtype = resolve_dtype(dtype)
    reader = reader or CheckpointReader(path)
    block = _block_size(config)
    with torch.device("meta"):
        model = Transformer(config, experts=experts)
    model = model.to_empty(device=device).to(dtype)
    if config.tie_word_embeddings:  # to_empty gives each module its own storage
        model.lm_head.weight = model.embed_tokens.weight
    # the gate's bias steers selection: keep it float32 whatever the model dtype
    for layer in model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None:
            gate.e_score_correction_bias = torch.empty(config.n_routed_experts, dtype=torch.float32, device=device)
    targets = dict(model.state_dict(keep_vars=True))
    if config.tie_word_embeddings:
        targets.pop("lm_head.weight", None)
    names = {checkpoint_name(p): p for p in targets}
    missing = [n for n in names if n not in reader]
    if missing:
        more = f" ({len(missing)} missing in all)" if len(missing) > 1 else ""
        raise ValueError(f"{path}: checkpoint is missing tensor {missing[0]!r}{more}")
    # shard order: each shard is opened once and read front to back
    order = sorted(names, key=lambda n: (reader.weight_map[n], n))
    try:
        with torch.no_grad():
            for name in tqdm(order, desc=f"loading {path.name}", unit="tensor", disable=not progress, leave=False):
                target = targets[names[name]]
                value = read_tensor(reader, name, tuple(target.shape), block, device=target.device)
                target.copy_(value.to(device=device, dtype=target.dtype))
    finally:
        reader.close()
    model.eval().requires_grad_(False)
    return model
