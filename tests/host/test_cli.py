"""mace-erase, the README's main command, run as a user runs it (a subprocess starting a real ComfyUI server)."""

import subprocess
import sys

import comfy_host

SCRIPT = comfy_host.PACK / "scripts" / "mace_erase.py"


def run_cli(*args, timeout=1200):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_erase_with_a_checkpoint_writes_images_and_lora(tmp_path, checkpoint):
    out = tmp_path / "out"
    r = run_cli("--checkpoint", str(checkpoint), "--concepts", "Claude Monet; Vincent van Gogh",
                "--concept-type", "style", "--size", "64", "--sample-steps", "2", "--images", "2", "--steps", "2",
                "--base-directory", str(tmp_path / "base"), "--out", str(out), "--name", "cli_erasure")
    assert r.returncode == 0, r.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert any("_before" in n and n.endswith(".png") for n in names), names
    assert any("_after" in n and n.endswith(".png") for n in names), names
    assert any("_check" in n and n.endswith(".png") for n in names), ("the labelled before/after grid", names)
    assert any(n.startswith("cli_erasure") and n.endswith(".safetensors") for n in names), names
    assert "done:" in r.stderr


def test_pickle_checkpoint_is_refused_before_anything_starts(tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"not a checkpoint")
    r = run_cli("--checkpoint", str(bad), "--base-directory", str(tmp_path / "base"), "--out", str(tmp_path / "o"),
                timeout=120)
    assert r.returncode != 0 and "only .safetensors" in r.stderr


def test_failed_node_reports_the_clear_error(tmp_path, checkpoint):
    r = run_cli("--checkpoint", str(checkpoint), "--concepts", "art", "--concept-type", "style", "--size", "64",
                "--base-directory", str(tmp_path / "base"), "--out", str(tmp_path / "o"), timeout=600)
    assert r.returncode != 0
    assert "input 'concepts'" in r.stderr and "same as its anchor" in r.stderr
