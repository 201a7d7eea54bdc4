#!/usr/bin/env bash
# Install third-party load generators (guidellm, optionally aiperf) into their own
# venvs under .bench-tools/<tool>, outside the project's .venv, for cross-checking
# `afd bench`. Idempotent: a tool whose venv already has the pinned version is skipped.
#
# usage: benchmarks/load_tools.sh [guidellm] [aiperf]      (default: guidellm)
# env:   BENCH_TOOLS_DIR (default <repo>/.bench-tools), PYTHON (default python3)
#        GUIDELLM_VERSION (default 0.8.1), AIPERF_VERSION (default 0.13.0)
#
# torch is installed first, pinned to 2.13.0: an unpinned torch pulled in as a
# dependency resolves to a ~5.5 GB CUDA build. The plain pin is tried first (the CPU
# wheel is on the machine's local wheel dir); the PyTorch CPU index is the fallback.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_DIR="${BENCH_TOOLS_DIR:-$ROOT/.bench-tools}"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"
declare -A PIN=(
  [guidellm]="guidellm==${GUIDELLM_VERSION:-0.8.1}"
  [aiperf]="aiperf==${AIPERF_VERSION:-0.13.0}"
)

tools=("$@")
[ ${#tools[@]} -eq 0 ] && tools=(guidellm)

log() { printf '[load_tools] %s\n' "$*" >&2; }
# pip warns once per package about this machine's file:// extra-index dirs; drop that noise.
pipq() { local py="$1"; shift
  "$py" -m pip "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }

install_tool() {
  local tool="$1" spec="${PIN[$1]:-}"
  [ -n "$spec" ] || { log "unknown tool: $tool (known: ${!PIN[*]})"; return 2; }
  local venv="$TOOLS_DIR/$tool" want="${spec#*==}"
  local py="$venv/bin/python"

  if [ -x "$py" ] && [ "$("$py" -m pip show "$tool" 2>/dev/null | sed -n 's/^Version: //p')" = "$want" ]; then
    log "$tool $want already installed in $venv, skipping"
    return 0
  fi

  local t0=$SECONDS
  [ -x "$py" ] || { log "creating venv $venv"; "$PYTHON" -m venv "$venv"; }

  if ! "$py" -m pip show torch >/dev/null 2>&1; then
    log "installing $TORCH_PIN"
    if ! pipq "$py" install -q "$TORCH_PIN"; then
      log "plain pin failed; retrying with --index-url $TORCH_CPU_INDEX"
      pipq "$py" install -q --index-url "$TORCH_CPU_INDEX" "$TORCH_PIN"
    fi
  fi

  log "installing $spec"
  # Keep torch pinned so the resolver cannot swap it for a CUDA build.
  pipq "$py" install -q "$spec" "$TORCH_PIN"

  # Guard: no CUDA torch / nvidia-* wheels must have been pulled in.
  if "$py" -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
    log "WARNING: nvidia-* packages were installed into $venv"
  fi
  log "$tool: $("$py" -m pip show "$tool" | sed -n 's/^Version: //p'), torch $("$py" -c 'import torch; print(torch.__version__)') ($((SECONDS - t0)) s)"
}

mkdir -p "$TOOLS_DIR"
for t in "${tools[@]}"; do install_tool "$t"; done
