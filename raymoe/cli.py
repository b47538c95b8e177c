"""The `raymoe` command line: one line of output per action, one line per error."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from raymoe.model.tiny import make_tiny

    kind = "fp8 (e4m3, 128x128 block scales)" if args.fp8 else "bf16"
    path = make_tiny(args.out_dir, fp8=args.fp8, seed=args.seed)
    shards = len(list(path.glob("model-*.safetensors")))
    print(f"raymoe: wrote a tiny DeepSeek-V3-shaped {kind} checkpoint (seed {args.seed}, {shards} shards) to {path}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from raymoe import LLM, SamplingParams
    from raymoe.model.tiny import default_checkpoint

    model = args.model or str(default_checkpoint())
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    prompts = args.prompt or ["Hello"]
    print(f"raymoe: generating {len(prompts)} completion(s) with {model} ({args.dtype})", flush=True)
    llm = LLM(model=model, dtype=args.dtype, max_model_len=args.max_model_len)
    for prompt, out in zip(prompts, llm.generate(prompts, params), strict=True):
        body = out.text if out.text is not None else " ".join(map(str, out.token_ids))
        print(f"{prompt!r} -> {body!r} [{out.finish_reason}]")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from raymoe.serve.runner import run_from_yaml

    print(f"raymoe: starting the serving app from {args.config}", flush=True)
    run_from_yaml(args.config, blocking=True)
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    from raymoe.serve.config import check_config_file

    failed = 0
    for path in args.files:
        problems = check_config_file(path)
        for problem in problems:
            print(f"{path}: {problem}")
        if problems:
            failed += 1
        else:
            print(f"{path}: ok")
    return 1 if failed else 0


def _cmd_bench(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from raymoe.serve.bench import main as bench_main

    return bench_main(list(rest))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raymoe", description="Serve DeepSeek-V3-style mixture-of-experts models on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write a small random DeepSeek-V3-shaped checkpoint")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--fp8", action="store_true", help="FP8 e4m3 weights with 128x128 block scales")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_tiny)

    p = sub.add_parser("generate", help="generate from the command line with the single-process engine")
    p.add_argument("--model", help="checkpoint directory (default: the generated tiny model)")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--max-model-len", type=int, default=None)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("serve", help="run the serving app described by a deployment YAML")
    p.add_argument("config", type=Path, nargs="?", default=Path("deployments/local.yaml"))
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("check-config", help="validate deployment YAMLs (layouts, GPUs, TP groups)")
    p.add_argument("files", type=Path, nargs="+")
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("bench", help="open-loop load generator against the HTTP endpoint", add_help=False)
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "bench":
            return args.func(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return args.func(args)
    except KeyboardInterrupt:
        print("raymoe: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        print(f"raymoe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
