"""Thin ComfyUI node wrappers around mace_core; host.py holds every ComfyUI internal they rely on."""
