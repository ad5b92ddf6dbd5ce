"""MACE Save LoRAs / MACE Load LoRAs inside a real ComfyUI: files the stock loader reads, read back identically."""

import sys

import comfy_host
import pytest
import torch
from safetensors.torch import save_file

SAVE, LOAD = "MACESaveLoRAs", "MACELoadLoRAs"
NAMES = ["Claude Monet", "Vincent van Gogh", "Pablo Picasso"]


def mod(pack_module, name):
    return sys.modules[f"{pack_module.__name__}.{name}"]


def bundle_for(pack_module, model, names=NAMES, rank=2, base=None):
    host, lb = mod(pack_module, "nodes.host"), mod(pack_module, "mace_core.lora_bundle")
    w0 = host.original_weights(model, host.cross_attention_keys(model))
    g = torch.Generator().manual_seed(0)
    loras = [lb.ConceptLoRA(n, "art", "style", rank, 40 + i,
                            {k: torch.randn(w.shape[0], rank, generator=g) for k, w in w0.items()},
                            {k: torch.randn(rank, w.shape[1], generator=g) for k, w in w0.items()},
                            alpha=1.0 if i == 1 else None, meta={"lr": 1e-4})
             for i, n in enumerate(names)]
    return lb.LoRABundle(loras, host.model_fingerprint(model) if base is None else base)


def load(pack, model, files, concept_type="celebrity", anchor="", check_base=True):
    return pack[LOAD].execute(model, files, concept_type, anchor, check_base).result[0]


def test_saved_loras_load_back_identical(pack, pack_module, tiny, loras_dir):
    model, _ = tiny
    bundle = bundle_for(pack_module, model)
    out = pack[SAVE].execute(bundle, "run1")
    files = sorted(p.name for p in (loras_dir / "mace").iterdir())
    assert files == ["run1_claude-monet.safetensors", "run1_pablo-picasso.safetensors",
                     "run1_vincent-van-gogh.safetensors"]
    assert "mace/run1_claude-monet.safetensors" in out.ui.as_dict()["text"][0]
    back = load(pack, model, "mace")
    assert back.base == bundle.base
    by_name = {lora.concept: lora for lora in back.loras}
    for a in bundle.loras:
        b = by_name[a.concept]
        for f in ("anchor", "concept_type", "rank", "steps", "alpha", "meta"):
            assert getattr(a, f) == getattr(b, f), (a.concept, f)
        for k in a.up:
            assert torch.equal(a.up[k], b.up[k]) and torch.equal(a.down[k], b.down[k])


def test_stock_loader_applies_a_saved_concept_lora(pack, pack_module, tiny, loras_dir):
    import nodes

    model, clip = tiny
    host = mod(pack_module, "nodes.host")
    bundle = bundle_for(pack_module, model)
    pack[SAVE].execute(bundle, "stock")
    loaded = nodes.NODE_CLASS_MAPPINGS["LoraLoader"]().load_lora(model, clip, "mace/stock_vincent-van-gogh.safetensors",
                                                                 1.0, 1.0)[0]
    keys = host.cross_attention_keys(model)
    got, w0 = host.current_weights(loaded, keys, "cpu"), host.current_weights(model, keys, "cpu")
    lora = bundle.loras[1]  # alpha 1 over rank 2: the loader must scale by 0.5 as we do
    for k in keys:
        assert torch.allclose(got[k] - w0[k], lora.delta(k), atol=1e-5)


def test_foreign_kohya_lora_with_concept_line(pack, pack_module, tiny, loras_dir):
    """A kohya file with diffusers-layout names (what most trainers write), fused under the concept the user names."""
    import comfy.utils

    model, _ = tiny
    host = mod(pack_module, "nodes.host")
    keys = host.cross_attention_keys(model)
    to_ldm = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    g = torch.Generator().manual_seed(1)
    sd, want = {}, {}
    for diffusers_key, ldm in to_ldm.items():
        k = "diffusion_model." + ldm
        if k in keys:
            name = "lora_unet_" + diffusers_key[: -len(".weight")].replace(".", "_")
            w = host.original_weights(model, [k])[k]
            up, down = torch.randn(w.shape[0], 4, generator=g), torch.randn(4, w.shape[1], generator=g)
            sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"] = up.half(), down.half()
            sd[f"{name}.alpha"] = torch.tensor(2.0)
            want[k] = up.half().float() @ down.half().float() * 0.5
    assert sorted(want) == keys
    save_file(sd, str(loras_dir / "monroe.safetensors"))
    bundle = load(pack, model, "monroe.safetensors => Marilyn Monroe", "celebrity")
    (lora,) = bundle.loras
    assert (lora.concept, lora.anchor, lora.concept_type) == ("Marilyn Monroe", "a person", "celebrity")
    assert bundle.base == ""  # a foreign file does not say which base it was trained on
    for k in keys:
        assert torch.allclose(lora.delta(k), want[k], atol=1e-4)


def test_bad_files_get_clear_errors(pack, pack_module, tiny, loras_dir):
    model, _ = tiny
    (loras_dir / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="input 'files': 'junk.safetensors' is not a safetensors file"):
        load(pack, model, "junk.safetensors => Claude Monet")
    with pytest.raises(ValueError, match="not a file or folder"):
        load(pack, model, "missing.safetensors => Claude Monet")
    with pytest.raises(ValueError, match="outside models/loras"):
        load(pack, model, "../secrets => Claude Monet")
    with torch.inference_mode():
        other = comfy_host.tiny_model(context_dim=128)
    pack[SAVE].execute(bundle_for(pack_module, other, NAMES[:1]), "other")
    with pytest.raises(ValueError, match="made for another model"):
        load(pack, model, "mace/other_claude-monet.safetensors")
    pack[SAVE].execute(bundle_for(pack_module, model, NAMES[:1], base="0123456789abcdef"), "elsewhere")
    with pytest.raises(ValueError, match="another base model"):
        load(pack, model, "mace/elsewhere_claude-monet.safetensors")
    relaxed = load(pack, model, "mace/elsewhere_claude-monet.safetensors", check_base=False)
    assert relaxed.base == "" and relaxed.concepts == ["Claude Monet"]
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 2)},
              str(loras_dir / "te.safetensors"))
    with pytest.raises(ValueError, match="no cross-attention"):
        load(pack, model, "te.safetensors => Claude Monet")
    with pytest.raises(ValueError, match="the LoRA bundle is empty"):
        pack[SAVE].execute(mod(pack_module, "mace_core.lora_bundle").LoRABundle([], ""), "x")
