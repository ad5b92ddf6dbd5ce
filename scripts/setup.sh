#!/usr/bin/env bash
# Sets up everything the pack, its tests and mace-erase need on a fresh machine; safe to run again.
#  - torch 2.13.0 first (the CPU wheel on these machines; later installs then never pull a CUDA build),
#  - ComfyUI's own Python dependencies and the pack's,
#  - a ComfyUI host at $COMFYUI_PATH (default ~/comfy/ComfyUI): extracted from a ComfyUI git directory
#    ($COMFYUI_GIT_DIR, or the mirror this workplace keeps) when none is there yet,
#  - the pack linked into the host's custom_nodes, so a ComfyUI server started from it loads the pack.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
host="${COMFYUI_PATH:-$HOME/comfy/ComfyUI}"
py="${PYTHON:-python3}"

say() { printf '[setup] %s\n' "$*"; }

if ! "$py" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.") else 1)' 2>/dev/null; then
  say "installing torch==2.13.0"
  "$py" -m pip install -q torch==2.13.0
fi
say "installing host and pack requirements"
"$py" -m pip install -q -r "$here/scripts/requirements-host.txt" -r "$here/requirements.txt"

if [ ! -f "$host/comfy/model_patcher.py" ]; then
  gitdir="${COMFYUI_GIT_DIR:-}"
  if [ -z "$gitdir" ]; then
    for d in /work/.mirror/Comfy-Org+ComfyUI/repo "$HOME/.mirror/Comfy-Org+ComfyUI/repo"; do
      [ -d "$d" ] && gitdir="$d" && break
    done
  fi
  if [ -n "$gitdir" ]; then
    say "extracting ComfyUI from $gitdir into $host"
    mkdir -p "$host"
    # One tokenizer blob (llama text encoders only) is absent from the snapshot; git still writes the rest.
    git --git-dir="$gitdir" archive HEAD -- . ':(exclude)comfy/text_encoders/llama_tokenizer/tokenizer.json' \
      | tar -x -C "$host"
  else
    say "no ComfyUI at $host and no ComfyUI git directory found: host tests will skip."
    say "Clone ComfyUI there (git clone https://github.com/comfyanonymous/ComfyUI $host) or set COMFYUI_PATH."
  fi
fi

if [ -d "$host/custom_nodes" ]; then
  link="$host/custom_nodes/comfyui-mace"
  if [ "$(readlink -f "$link" 2>/dev/null)" != "$here" ]; then
    rm -rf "$link"
    ln -s "$here" "$link"
    say "linked the pack into $link"
  fi
fi
say "done (host: $host)"
