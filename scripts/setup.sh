#!/usr/bin/env bash
# Sets up what the pack, its tests and mace-erase need; safe to run again.
#
# Where the ComfyUI host comes from, in this order:
#   1. COMFYUI_PATH, when it points at a ComfyUI. That is the user's own install: it gets the pack's requirements
#      (and pytest) only, never pinned host packages, so its torch and frontend stay as they are.
#   2. Otherwise a headless host at ~/comfy/ComfyUI, extracted from the pinned ComfyUI source archive
#      ($MACE_COMFYUI_ARCHIVE, else ../shared/host/ beside this checkout), checksum verified.
#   3. Otherwise the same pinned commit cloned from upstream git.
# A headless host built here gets torch 2.13.0 first (the CPU wheel; later installs then never pull a CUDA
# build), then ComfyUI's own requirements less torch/torchvision/torchaudio, so its web UI works too.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
pin_version="0.3.64"
pin_commit="a125cd84b054a57729b5eecab930ca9408719832"
pin_archive="ComfyUI-${pin_version}-${pin_commit:0:12}.tar.gz"
pin_sha256="e09020dd5710d2fca5661c536260b604b28b9d1eb5b5898a02178a2a2eca232e"
upstream="https://github.com/Comfy-Org/ComfyUI"
marker=".mace-headless-host"

say() { printf '[setup] %s\n' "$*"; }
is_comfy() { [ -f "$1/comfy/model_patcher.py" ] && [ -f "$1/main.py" ]; }
pip_install() { "$py" -m pip install -q --disable-pip-version-check "$@"; }

link_pack() {
  local link="$1/custom_nodes/comfyui-mace"
  mkdir -p "$1/custom_nodes"
  if [ "$(readlink -f "$link" 2>/dev/null)" != "$here" ]; then
    rm -rf "$link"
    ln -s "$here" "$link"
    say "linked the pack into $link"
  fi
}

if [ -n "${COMFYUI_PATH:-}" ] && is_comfy "$COMFYUI_PATH" && [ ! -f "$COMFYUI_PATH/$marker" ]; then
  host="$(cd "$COMFYUI_PATH" && pwd)"
  say "using your ComfyUI at $host: installing the pack's requirements only"
  pip_install -r "$here/requirements.txt"
  "$py" -c 'import pytest' 2>/dev/null || pip_install pytest
  link_pack "$host"
  say "done (host: $host, yours)"
  exit 0
fi

host="${COMFYUI_PATH:-$HOME/comfy/ComfyUI}"

if ! "$py" -c 'import torch' 2>/dev/null; then
  say "installing torch==2.13.0"
  pip_install torch==2.13.0
fi

if ! is_comfy "$host"; then
  archive="${MACE_COMFYUI_ARCHIVE:-$here/../shared/host/$pin_archive}"
  if [ -f "$archive" ]; then
    say "verifying $(basename "$archive")"
    got="$(sha256sum "$archive" | cut -d' ' -f1)"
    if [ "$got" != "$pin_sha256" ]; then
      say "checksum mismatch for $archive (got $got, want $pin_sha256): not extracting it"
      exit 1
    fi
    say "extracting ComfyUI $pin_version into $host"
    mkdir -p "$host"
    tar -xzf "$archive" -C "$host" --strip-components=1
  else
    say "no archive at $archive: cloning ComfyUI $pin_version from upstream"
    tmp="$host.clone.$$"
    git clone -q "$upstream" "$tmp"
    git -C "$tmp" checkout -q "$pin_commit"
    mkdir -p "$host" && cp -a "$tmp/." "$host/" && rm -rf "$tmp"
  fi
  is_comfy "$host" || { say "the host at $host is incomplete"; exit 1; }
  touch "$host/$marker"
fi

if [ -f "$host/$marker" ]; then
  say "installing ComfyUI's requirements (less torch, torchvision, torchaudio) and the pack's"
  reqs="$(mktemp)"
  # spandrel declares torchvision, which would pull another torch: its other requirements are ComfyUI's own.
  grep -vE '^\s*(torch|torchvision|torchaudio|spandrel)\s*$' "$host/requirements.txt" >"$reqs"
  # requests: ComfyUI 0.3.64's server imports it (app/frontend_management.py) but its requirements.txt omits it
  pip_install -r "$reqs" -r "$here/requirements.txt" -r "$here/scripts/requirements-dev.txt" requests
  pip_install --no-deps spandrel
  rm -f "$reqs"
fi

link_pack "$host"
say "done (host: $host)"
