"""LoRA files: MACE's own round trip, the foreign namings the stock loader reads, and clear refusals."""

import pytest
import torch
from safetensors.torch import save_file

from mace_core import lora_files as lf
from mace_core.concepts import Concept
from mace_core.errors import MaceInputError
from mace_core.lora_bundle import ConceptLoRA

K = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
V = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"
SHAPES = {K: (8, 16), V: (8, 16)}


def lora(alpha=None, rank=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    up = {k: torch.randn(o, rank, generator=g).to(dtype) for k, (o, d) in SHAPES.items()}
    down = {k: torch.randn(rank, d, generator=g).to(dtype) for k, (o, d) in SHAPES.items()}
    return ConceptLoRA("Claude Monet", "art", "style", rank, 50, up, down, alpha, {"lr": 1e-4, "seed": 3})


@pytest.mark.parametrize("alpha", [None, 1.0])
def test_round_trip_is_identical(tmp_path, alpha):
    a = lora(alpha)
    path = str(tmp_path / "x.safetensors")
    lf.save_lora(path, a, base="abc123")
    b, base = lf.load_lora(path, SHAPES)
    assert base == "abc123"
    for f in ("concept", "anchor", "concept_type", "rank", "steps", "alpha", "meta"):
        assert getattr(a, f) == getattr(b, f), f
    for k in SHAPES:
        assert torch.equal(a.up[k], b.up[k]) and torch.equal(a.down[k], b.down[k])
    _, meta = lf.read(path)
    assert meta["mace_concept"] == "Claude Monet" and meta["mace_format_version"] == lf.FORMAT_VERSION
    tensors, _ = lf.read(path)
    assert set(tensors) == {f"{lf.module_of(k)}.{s}" for k in SHAPES for s in ("lora_up.weight", "lora_down.weight",
                                                                                   "alpha")}
    # the stock loader's scale alpha / rank equals ours
    assert float(tensors[f"{lf.module_of(K)}.alpha"]) / 2 == pytest.approx(a.scale)


def test_foreign_namings_map_onto_model_keys(tmp_path):
    a = lora()
    kohya = {}
    for k, name in ((K, "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"),
                    (V, "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_v")):
        kohya[f"{name}.lora_up.weight"] = a.up[k]
        kohya[f"{name}.lora_down.weight"] = a.down[k]
        kohya[f"{name}.alpha"] = torch.tensor(1.0 if k == K else 4.0)  # per-key alpha: folded into up
    kohya["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(4, 2)  # ignored
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    b, base = lf.load_lora(str(tmp_path / "kohya.safetensors"), SHAPES, concept="Claude Monet", anchor="art",
                           concept_type="style")
    assert base == "" and b.alpha is None
    assert torch.allclose(b.delta(K), a.up[K] @ a.down[K] * 0.5)
    assert torch.allclose(b.delta(V), a.up[V] @ a.down[V] * 2.0)

    peft = {f"{lf.module_of(k)}.lora_B.weight": a.up[k] for k in SHAPES}
    peft |= {f"{lf.module_of(k)}.lora_A.weight": a.down[k] for k in SHAPES}
    save_file(peft, str(tmp_path / "peft.safetensors"))
    c, _ = lf.load_lora(str(tmp_path / "peft.safetensors"), SHAPES, concept="x")
    assert all(torch.allclose(c.delta(k), a.delta(k)) for k in SHAPES)

    # a diffusers-style name is understood through the key map the host supplies
    diffusers = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.up.weight": a.up[K],
                 "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight": a.down[K]}
    save_file(diffusers, str(tmp_path / "diffusers.safetensors"))
    key_map = lf.default_key_map(SHAPES) | {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k": K}
    d, _ = lf.load_lora(str(tmp_path / "diffusers.safetensors"), SHAPES, key_map, concept="x")
    assert d.keys == [K] and torch.allclose(d.delta(K), a.delta(K))


def test_full_difference_file_is_exact(tmp_path):
    g = torch.Generator().manual_seed(1)
    deltas = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    sd, err = lf.erasure_tensors(deltas, "full")
    assert err == 0.0 and set(sd) == {f"{lf.module_of(k)}.diff" for k in SHAPES}
    meta = lf.erasure_metadata([Concept("a b", "c", "style")], "f", "full", 0, 0)
    lf.write(str(tmp_path / "e.safetensors"), sd, meta)
    b, _ = lf.load_lora(str(tmp_path / "e.safetensors"), SHAPES, concept="a b")
    assert all(torch.allclose(b.delta(k), deltas[k], atol=1e-6) for k in SHAPES)
    with pytest.raises(MaceInputError, match="erasure of several concepts"):
        lf.load_lora(str(tmp_path / "e.safetensors"), SHAPES)


def test_low_rank_erasure_error_is_the_discarded_spectrum():
    g = torch.Generator().manual_seed(2)
    exact = {k: torch.randn(o, 3, generator=g) @ torch.randn(3, d, generator=g) for k, (o, d) in SHAPES.items()}
    sd, err = lf.erasure_tensors(exact, "low rank", rank=3)
    assert err < 1e-6
    m = lf.module_of(K)
    assert torch.allclose(sd[f"{m}.lora_up.weight"] @ sd[f"{m}.lora_down.weight"], exact[K], atol=1e-5)
    noisy = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    _, err = lf.erasure_tensors(noisy, "low rank", rank=2)
    assert 0.3 < err < 1.0


def test_bad_files_are_refused_clearly(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"this is not a tensor file at all")
    with pytest.raises(MaceInputError, match="not a safetensors file"):
        lf.load_lora(str(tmp_path / "junk.safetensors"), SHAPES, concept="x")
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x04\x95")  # never opened: pickles can run code
    with pytest.raises(MaceInputError, match="pickled"):
        lf.load_lora(str(tmp_path / "old.ckpt"), SHAPES, concept="x")
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 2)},
              str(tmp_path / "te.safetensors"))
    with pytest.raises(MaceInputError, match="no cross-attention"):
        lf.load_lora(str(tmp_path / "te.safetensors"), SHAPES, concept="x")
    big = lora()
    big.up = {k: torch.zeros(12, 2) for k in SHAPES}
    lf.save_lora(str(tmp_path / "big.safetensors"), big)
    with pytest.raises(MaceInputError, match="another model"):
        lf.load_lora(str(tmp_path / "big.safetensors"), SHAPES)
    save_file({f"{lf.module_of(K)}.lora_up.weight": torch.zeros(8, 2)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(MaceInputError, match="half a LoRA"):
        lf.load_lora(str(tmp_path / "half.safetensors"), SHAPES, concept="x")
    save_file({f"{lf.module_of(K)}.hada_w1_a": torch.zeros(8, 2)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(MaceInputError, match="LoHa"):
        lf.load_lora(str(tmp_path / "loha.safetensors"), SHAPES, concept="x")
    save_file({f"{lf.module_of(K)}.lora_up.weight": torch.zeros(8, 2),
               f"{lf.module_of(K)}.lora_down.weight": torch.zeros(2, 16)}, str(tmp_path / "anon.safetensors"))
    with pytest.raises(MaceInputError, match="which concept"):
        lf.load_lora(str(tmp_path / "anon.safetensors"), SHAPES)
