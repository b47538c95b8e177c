"""The `raymoe` command line: one line of output per action, one line per error."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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
    run_from_yaml(args.config, blocking=True, num_gpus=args.num_gpus)
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


class CommandError(Exception):
    """A failure the command explains in one line (`raymoe: error: ...`)."""


DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "RAYMOE_API_KEY"  # the ingress's keys (comma-separated): the first one is sent


def _api_key(given: str | None) -> str | None:
    keys = [k.strip() for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip()]
    return given or (keys[0] if keys else None)


def _get_json(url: str, api_key: str | None, timeout: float) -> Any:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise CommandError(f"{url}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:300]}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise CommandError(f"{url}: not reachable ({getattr(exc, 'reason', exc)})") from None


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def experts_lines(body: dict[str, Any]) -> list[str]:
    """`raymoe experts`: one line per unit replica of `GET /v1/experts`."""
    trackers = body.get("trackers") or {}
    out = []
    for u in body.get("units", []):
        imb = u.get("imbalance")
        line = (f"{u['role']:<8} replica={u['replica']} placement_version={u.get('placement_version')} "
                f"imbalance={'-' if imb is None else f'{imb:.3f}'} migrations={u.get('migrations')}")
        t = trackers.get(u["role"]) or {}
        if t.get("projected_imbalance") is not None:
            line += f" re-planned={t['projected_imbalance']:.3f} skipped={t.get('skipped', 0)}"
        last = u.get("last_migration")
        if last:
            line += (f" last: moved={last['moved']} ({_fmt_bytes(last['bytes'])}) stage={last['stage_s']:.2f}s "
                     f"commit={last['commit_s'] * 1000:.1f}ms")
        if not u.get("expert_parallel", True):
            line += " (single process: hosts every expert)"
        elif u.get("error"):
            line += f" error: {u['error']}"
        out.append(line)
    return out or ["raymoe: no unit replicas report expert state"]


def _cmd_experts(args: argparse.Namespace) -> int:
    body = _get_json(args.url.rstrip("/") + "/v1/experts", _api_key(args.api_key), args.timeout)
    for line in experts_lines(body):
        print(line)
    return 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _cmd_grafana_import(args: argparse.Namespace) -> int:
    """Provision the dashboards of grafana/ into a Grafana (grafana-client, the `grafana` extra)."""
    import json

    try:
        from grafana_client import GrafanaApi
    except ImportError:
        raise CommandError("grafana-client is not installed: pip install 'raymoe[grafana]'") from None
    url = args.url or os.environ.get("GRAFANA_URL") or "http://127.0.0.1:3000"
    key = args.api_key or os.environ.get("GRAFANA_API_KEY") or os.environ.get("GRAFANA_TOKEN")
    files = args.files or sorted((Path(__file__).resolve().parents[1] / "grafana").glob("*.json"))
    if not files:
        raise CommandError("no dashboards given and none found in grafana/")
    api = GrafanaApi.from_url(url, credential=key, timeout=args.timeout)
    try:
        api.health.check()
    except Exception as exc:  # the connection's error: its first line says enough
        raise CommandError(f"Grafana at {url} is not reachable: {_first_line(exc)}") from None
    for path in files:
        dashboard = json.loads(Path(path).read_text())
        dashboard.pop("id", None)  # matched by uid: a re-import replaces the dashboard
        try:
            api.dashboard.update_dashboard({"dashboard": dashboard, "overwrite": True, "folderUid": args.folder_uid,
                                            "message": "raymoe grafana-import"})
        except Exception as exc:  # grafana-client's errors, or the connection's
            raise CommandError(f"{url}: could not import {path}: {_first_line(exc)}") from None
        print(f"raymoe: imported {path} as {dashboard.get('uid')!r} ({dashboard.get('title')}) into {url}")
    return 0


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
    p.add_argument("--num-gpus", type=int, default=None,
                   help="GPUs the local Ray instance declares (simulated on a CPU machine: deployments/local-ep.yaml)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("check-config", help="validate deployment YAMLs (layouts, GPUs, TP groups)")
    p.add_argument("files", type=Path, nargs="+")
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("experts", help="each unit's expert placement, imbalance and migrations (GET /v1/experts)")
    p.add_argument("url", nargs="?", default=DEFAULT_URL, help=f"the app's base URL (default {DEFAULT_URL})")
    p.add_argument("--api-key", help=f"bearer key (default: the first of ${API_KEY_ENV})")
    p.add_argument("--timeout", type=float, default=30.0)
    p.set_defaults(func=_cmd_experts)

    p = sub.add_parser("grafana-import", help="provision the Grafana dashboards (grafana-client, the 'grafana' extra)")
    p.add_argument("files", type=Path, nargs="*", help="dashboard JSON files (default: grafana/*.json)")
    p.add_argument("--url", help="Grafana's URL (default: $GRAFANA_URL or http://127.0.0.1:3000)")
    p.add_argument("--api-key", help="a service-account token (default: $GRAFANA_API_KEY or $GRAFANA_TOKEN)")
    p.add_argument("--folder-uid", default=None, help="the folder to import into (default: General)")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=_cmd_grafana_import)

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
    except (CommandError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        print(f"raymoe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
