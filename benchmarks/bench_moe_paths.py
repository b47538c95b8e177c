"""The routed experts' three CPU paths side by side: grouped GEMM, padded batched matmul, matmul pair per expert.

`MoE.expert_forward` picks one per call (`use_grouped_mm`, `prefer_padded`, `PAD_ROWS_PER_EXPERT`);
this times each path forced, on the same routed tokens of one MoE layer of the tiny model (top-8
of 64 experts, hidden 256, expert width 64), with interleaved repeats and medians, and prints
what the default picks. The default tiny checkpoint is cast to --dtype at load.

    python benchmarks/bench_moe_paths.py [--dtype bfloat16] [--threads 1] [--tokens 16 64 128 256 1024 2048]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from raymoe.model.config import ModelConfig
from raymoe.model.deepseek_v3 import MoE
from raymoe.model.tiny import default_checkpoint
from raymoe.model.weights import load_checkpoint

PATHS = {"grouped": (True, 0), "padded": (False, 10**9), "per-expert": (False, -(10**9))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 128, 256, 1024, 2048])
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    path = default_checkpoint()
    cfg = ModelConfig.from_checkpoint(path)
    model = load_checkpoint(path, cfg, dtype=dtype, device="cpu")
    moe = next(layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE))
    g = torch.Generator().manual_seed(0)
    print(f"bench_moe_paths: {args.dtype}, {args.threads} thread(s), ms per expert_forward (median of {args.repeats})")
    print("| tokens | grouped | padded | per-expert | default picks |")
    print("|---:|---:|---:|---:|---|")
    with torch.inference_mode():
        for t in args.tokens:
            x = torch.randn(t, cfg.hidden_size, generator=g).to(dtype)
            ids, w = moe.route(x)
            times: dict[str, list[float]] = {k: [] for k in PATHS}
            for _ in range(args.repeats):
                for name, (grouped, pad) in PATHS.items():  # interleaved: drift hits every path alike
                    moe.GROUPED_MM, moe.PAD_ROWS_PER_EXPERT = grouped, pad
                    t0 = time.perf_counter()
                    moe.expert_forward(x, ids, w)
                    times[name].append(time.perf_counter() - t0)
            del moe.GROUPED_MM, moe.PAD_ROWS_PER_EXPERT
            med = {k: statistics.median(v[2:]) * 1e3 for k, v in times.items()}  # the first two warm up
            default = statistics.median(_time_default(moe, x, ids, w, args.repeats)) * 1e3
            picked = min(med, key=lambda k: abs(med[k] - default))
            print(f"| {t} | {med['grouped']:.2f} | {med['padded']:.2f} | {med['per-expert']:.2f} | "
                  f"{default:.2f} (~{picked}) |", flush=True)


def _time_default(moe: MoE, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        moe.expert_forward(x, ids, w)
        out.append(time.perf_counter() - t0)
    return out[2:]


if __name__ == "__main__":
    main()
