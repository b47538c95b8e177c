"""Running the app as `raymoe serve` does: Ray, Serve's HTTP options from the YAML, the app, and
Serve's direct ingress (each ingress replica's own HTTP port).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from ray import serve

from raymoe.serve.app import build_app
from raymoe.serve.config import check_config, load_config_file, load_serve_yaml

# Serve's direct ingress (Ray >= 2.50): each ingress replica answers HTTP on its own port, so a
# request skips the proxy hop (one Ray streaming message per SSE event fewer). Serve reads the flag
# when its processes start: set before `ray.init` starts Ray here, or before `ray start` on a
# cluster (cluster.yaml). The proxy keeps serving the configured port (every route) beside it.
DIRECT_INGRESS_ENV = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}


def enable_direct_ingress() -> None:
    """Turn direct ingress on for a Ray instance this process is about to start."""
    os.environ.update(DIRECT_INGRESS_ENV)


def direct_ingress_urls(app_name: str, host: str | None = None) -> list[str]:
    """Base URLs of the app's ingress replicas' own HTTP servers (empty without direct ingress)."""
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    groups = ray.get(client._controller.get_target_groups.remote(app_name))
    urls = []
    for group in groups:
        if str(group.protocol.value) != "HTTP" or group.app_name != app_name:
            continue
        prefix = group.route_prefix.rstrip("/")
        for t in group.targets:
            if t.name.startswith("SERVE_REPLICA::"):  # a replica, not a proxy (the fallback target)
                urls.append(f"http://{host or t.ip}:{t.port}{prefix}")
    return urls


def run_from_yaml(
    path: str | Path, *, blocking: bool = True, http_port: int | None = None, direct_ingress: bool = True,
    num_gpus: int | None = None,
) -> Any:
    """Start Ray (or join RAY_ADDRESS), Serve with the file's HTTP options, and the app.

    `num_gpus`: the GPUs the local Ray instance's node declares, real or not: simulated GPUs let the
    expert-parallel runtime run its units on one CPU machine (workers on CPU, gloo), as
    `deployments/local-ep.yaml` does. Only for a Ray instance started here."""
    import ray

    app_entry, _ = load_serve_yaml(path)
    cfg = load_config_file(path)
    problems = check_config(cfg)
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    import yaml

    doc = yaml.safe_load(Path(path).read_text())
    http = dict(doc.get("http_options") or {})
    if http_port is not None:
        http["port"] = http_port
    owns_ray = False
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or "local"
        owns_ray = address == "local"
        if num_gpus is not None and not owns_ray:
            raise ValueError(f"num_gpus: declares a local Ray instance's GPUs, but RAY_ADDRESS={address} joins a cluster")
        if direct_ingress and owns_ray:
            enable_direct_ingress()
        ray.init(address=address, **({"num_gpus": num_gpus} if num_gpus is not None else {}))
    serve.start(http_options=http, proxy_location=doc.get("proxy_location", "HeadOnly"))
    host, port = http.get("host", "127.0.0.1"), http.get("port", 8000)
    name = app_entry.get("name", "raymoe")
    prefix = app_entry.get("route_prefix", "/")
    print(f"raymoe: starting {cfg.model.served_name()} ({'disaggregated' if cfg.disaggregated else 'unified'})", flush=True)
    handle = serve.run(build_app(cfg), name=name, route_prefix=prefix, blocking=False)
    print(f"raymoe: serving {cfg.model.served_name()} at http://{host}:{port}{prefix.rstrip('/')}/v1", flush=True)
    loopback = host if host in ("127.0.0.1", "localhost") else None
    for url in direct_ingress_urls(name, loopback):
        print(f"raymoe: direct ingress (no proxy hop) at {url}/v1", flush=True)
    if not blocking:
        return handle

    def _stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second SIGTERM must not cut the shutdown short
        raise KeyboardInterrupt

    # SIGTERM (how a supervisor, or a background shell's kill, stops a server) shuts down as Ctrl-C
    # does; otherwise the handler Ray's core installs aborts the process with a stack dump
    signal.signal(signal.SIGTERM, _stop)
    try:
        while True:
            time.sleep(10)
    except KeyboardInterrupt:
        print("raymoe: shutting down", flush=True)
        if owns_ray:  # a Ray instance of our own: stop it at once (Serve would drain ingress replicas ~35 s)
            ray.shutdown()
        else:
            serve.shutdown()
    return handle
