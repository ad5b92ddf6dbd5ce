"""The world's networks, built from ComfyUI's own classes at toy width: an SD1.5 UNet and an SD1 CLIP-L text model,
or (family "sdxl") an SDXL UNet with CLIP-L + CLIP-G text models, a pooled vector and size conditioning.

ComfyUI never initialises weights (its ops skip reset_parameters), so every builder here takes a generator.
"""

import torch

# The keys comfy.model_detection.detect_unet_config yields for an SD1.x UNet; SD15's extra config then sets 8 heads.
UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "channel_mult": [1, 2],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 64,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
    "num_head_channels": 16,
}

# Overrides of ComfyUI's sd1_clip_config.json (CLIP-L: 768 wide, 12 layers)
CLIP_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
               "num_hidden_layers": 2, "projection_dim": 64}

# residual branch outputs start at zero so every block starts as identity (as SD's own init does)
_ZERO_SUFFIXES = ("out_layers.3.weight", "proj_out.weight", "out.2.weight", "attn1.to_out.0.weight",
                  "attn2.to_out.0.weight", "ff.net.2.weight")


def init_unet_(unet, g, key_value_std: float | None = None):
    """Weights normal with std 1/sqrt(fan-in); key_value_std, when given, is the cross-attention key and value
    projections' std instead (train.KEY_VALUE_STD says why). The draws are the same either way, only scaled."""
    with torch.no_grad():
        for name, p in sorted(unet.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim >= 2:
                if name.endswith(_ZERO_SUFFIXES):
                    p.zero_()
                else:
                    std = 1 / p[0].numel() ** 0.5
                    if key_value_std and name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
                        std = key_value_std
                    p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


# CLIP-L's final-norm features, the context SD1.x's UNet reads, are 768 wide with entries of about unit size: each
# token's vector has norm about sqrt(768) = 28. MACE's LoRA down matrix starts at a fixed scale whatever the width
# (N(0, 1/rank^2)), so how far a LoRA step moves a key is proportional to that norm, and a 64-wide toy at unit entries
# (norm 8) would be 3.5x harder to move than SD. The SD1.5 world's final norm therefore starts with gain
# sqrt(768 / width), giving its tokens SD's norm; the UNet's key and value projections learn at that scale.
CONTEXT_NORM_WIDTH = 768


def init_clip_(clip_model, g, context_gain: float = 1.0):
    with torch.no_grad():
        for name, p in sorted(clip_model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("final_layer_norm.weight"):
                p.fill_(context_gain)
            elif name.endswith("token_embedding.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith("position_embedding.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif name.endswith("logit_scale"):
                p.fill_(4.6055)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


TEXT_WIDTH = CLIP_CONFIG["hidden_size"]
HEAD_WIDTH = 32  # text attention head width, kept when the text encoder is widened


def configs(text_width: int | None = None, head_channels: int | None = None) -> tuple[dict, dict]:
    """(unet_config, clip_config) for a world whose text features (the UNet's context) are text_width wide;
    head_channels sets the UNet's attention head width (default: SD15's 8 heads)."""
    w = TEXT_WIDTH if text_width is None else int(text_width)
    if w < HEAD_WIDTH or w % HEAD_WIDTH:
        raise ValueError(f"text width must be a positive multiple of {HEAD_WIDTH}, got {w}")
    clip = dict(CLIP_CONFIG, hidden_size=w, intermediate_size=2 * w, projection_dim=w,
                num_attention_heads=w // HEAD_WIDTH)
    unet = dict(UNET_CONFIG, context_dim=w)
    if head_channels:
        unet.update(num_heads=-1, num_head_channels=int(head_channels))
    return unet, clip


# --- SDXL architecture ------------------------------------------------------------------------------------------
FAMILIES = ("sd15", "sdxl")
SIZE_EMBED = 6 * 256  # SDXL's y: pooled vector, then six 256-wide sinusoidal size embeddings (h, w, crops, targets)
# CLIP-L 32 wide and CLIP-G 64 wide (text heads 32 wide, as the SD1.5 world's), so clip_g carries two thirds of the
# UNet's 96-wide context and the pooled vector, as SDXL's 1280-wide CLIP-G carries 1280 of its 2048 beside CLIP-L's 768.
# (World v1 had 32 + 32; erasing 8 at lr 3e-3 this one scores MACE H 0.87 there 0.77: docs/sdxl_world.md.) Three
# layers each: the family reads the penultimate layer for the context and clip_g's last one for the pooled vector.
SDXL_TEXT_WIDTHS = (32, 64)
SDXL_TEXT_LAYERS = 3
# ComfyUI's SDXL configuration sets 64-channel heads, which do not divide the toy's 32 channels; 16 gives 2 and 4 heads
SDXL_HEAD_CHANNELS = 16


def sdxl_configs(widths=SDXL_TEXT_WIDTHS) -> tuple[dict, dict]:
    """(unet_config, {"clip_l": config, "clip_g": config}) of the SDXL world."""
    wl, wg = (int(w) for w in widths)
    text = []
    for w in (wl, wg):
        if w < HEAD_WIDTH or w % HEAD_WIDTH:
            raise ValueError(f"text width must be a positive multiple of {HEAD_WIDTH}, got {w}")
        text.append(dict(CLIP_CONFIG, hidden_size=w, intermediate_size=2 * w, projection_dim=w,
                         num_attention_heads=w // HEAD_WIDTH, num_hidden_layers=SDXL_TEXT_LAYERS))
    unet = dict(UNET_CONFIG, context_dim=wl + wg, use_linear_in_transformer=True, num_classes="sequential",
                adm_in_channels=wg + SIZE_EMBED, num_head_channels=SDXL_HEAD_CHANNELS)
    return unet, {"clip_l": text[0], "clip_g": text[1]}


def family_of(unet_config: dict | None) -> str:
    return "sdxl" if (unet_config or {}).get("num_classes") == "sequential" else "sd15"


def new_base_model(unet_config: dict | None = None):
    """The world's BaseModel: SD1.5 (see new_sd15_model) or, for an SDXL config (sdxl_configs), ComfyUI's SDXL model
    class with the same v-prediction."""
    if family_of(unet_config) == "sd15":
        return new_sd15_model(unet_config)
    import comfy.model_base
    import comfy.supported_models

    conf = comfy.supported_models.SDXL(dict(unet_config))
    # the family's extra config has just set 64-channel heads; the world's own choice is in its config
    conf.unet_config["num_head_channels"] = unet_config["num_head_channels"]
    conf.unet_config["num_heads"] = -1
    conf.set_inference_dtype(torch.float32, None)
    return comfy.model_base.SDXL(conf, model_type=comfy.model_base.ModelType.V_PREDICTION)


def init_label_emb_(unet, g):
    """SDXL's first label-embedding layer reads [pooled | size embeddings]. In SDXL the pooled vector is 1280 of its
    2816 inputs; at the toy's 32 of 1568 a plain 1/sqrt(fan_in) start would leave the text 2 % of the signal. Each
    block starts with half the output variance instead, so the pooled vector is a real road into the UNet, as in
    SDXL (and the road MACE's pooled editing must close)."""
    lin = unet.label_emb[0][0]
    pooled = lin.weight.shape[1] - SIZE_EMBED
    with torch.no_grad():
        w = torch.randn(lin.weight.shape, generator=g)
        w[:, :pooled] /= (2 * pooled) ** 0.5
        w[:, pooled:] /= (2 * SIZE_EMBED) ** 0.5
        lin.weight.copy_(w)


def new_sd15_model(unet_config: dict | None = None):
    """An SD1.5 BaseModel (ComfyUI class) with the world's UNet config, v-prediction, weights uninitialised.

    v-prediction, not SD1.5's epsilon: at high noise an epsilon model must reproduce its input exactly, and
    whatever a briefly trained toy UNet misses there (the finest 8x8 noise patterns) the sampler multiplies
    by sigma_max (14.6) and leaves in the picture. A v model predicts the image itself there.
    """
    import comfy.model_base
    import comfy.supported_models

    config = dict(UNET_CONFIG if unet_config is None else unet_config)
    conf = comfy.supported_models.SD15(dict(config))
    if config.get("num_heads") == -1:  # the world's own head width (SD15's extra config has just set 8 heads)
        conf.unet_config["num_heads"] = -1
        conf.unet_config["num_head_channels"] = config["num_head_channels"]
    conf.set_inference_dtype(torch.float32, None)
    return comfy.model_base.BaseModel(conf, model_type=comfy.model_base.ModelType.V_PREDICTION)


def patcher(base_model):
    import comfy.model_management as mm
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(base_model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def new_clip(clip_config: dict | None = None):
    """comfy.sd.CLIP for SD1 with the bundled tokenizer and the toy text model, weights uninitialised; for an SDXL
    config ({"clip_l": ..., "clip_g": ...}) ComfyUI's SDXL tokenizer and text model pair."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base

    if clip_config is not None and "clip_g" in clip_config:
        target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
        return comfy.sd.CLIP(target, model_options={"dtype": torch.float32,
                                                    "clip_l_model_config": dict(clip_config["clip_l"]),
                                                    "clip_g_model_config": dict(clip_config["clip_g"])})
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    config = dict(CLIP_CONFIG if clip_config is None else clip_config)
    return comfy.sd.CLIP(target, model_options={"dtype": torch.float32, "clip_l_model_config": config})


def token_ids(clip, text):
    """The 77 token ids ComfyUI feeds the text model for a prompt (as CLIPTextEncode tokenizes it)."""
    tokens = clip.tokenize(text)["l"]
    assert len(tokens) == 1 and all(w == 1.0 for _, w in tokens[0]), "world prompts: one chunk, no weights"
    return [int(t[0]) for t in tokens[0]]


def encode_ids(clip, ids, token_embeds=None):
    """Differentiable per-token context (B, 77, dim) for token ids (B, 77), equal to what CLIPTextEncode gives.

    ComfyUI's CLIPLayer adds its residuals in place (fine for inference, fatal for autograd), so the layers'
    own submodules are chained here with out-of-place residual adds. token_embeds (B, 77, dim) replaces the
    token-embedding lookup (training keeps a compact table of the few tokens the world uses).
    """
    from comfy.ldm.modules.attention import optimized_attention_for_device

    tm = clip.cond_stage_model.clip_l.transformer.text_model
    if token_embeds is None:
        x = tm.embeddings(ids, dtype=torch.float32)
    else:
        x = token_embeds + tm.embeddings.position_embedding.weight[: ids.shape[1]]
    n = ids.shape[1]
    causal = torch.full((n, n), -torch.finfo(x.dtype).max, dtype=x.dtype).triu_(1)
    attention = optimized_attention_for_device(x.device, mask=True, small_input=True)
    for layer in tm.encoder.layers:
        x = x + layer.self_attn(layer.layer_norm1(x), causal, attention)
        x = x + layer.mlp(layer.layer_norm2(x))
    return tm.final_layer_norm(x)


def text_keys(clip) -> list[str]:
    """The tokenizer keys of the world's text models: ["l"] (SD1.5) or ["l", "g"] (SDXL)."""
    return ["l", "g"] if hasattr(clip.cond_stage_model, "clip_g") else ["l"]


def text_model(clip, key):
    return getattr(clip.cond_stage_model, f"clip_{key}").transformer


def all_token_ids(clip, text) -> dict:
    """{key: the 77 token ids} per text model (SDXL's clip_g pads with 0, clip_l with the end token)."""
    tokens = clip.tokenize(text)
    out = {}
    for key in text_keys(clip):
        chunks = tokens[key]
        assert len(chunks) == 1 and all(w == 1.0 for _, w in chunks[0]), "world prompts: one chunk, no weights"
        out[key] = [int(t[0]) for t in chunks[0]]
    return out


def _layers(tm, x, start, stop):
    """Text layers start..stop-1 with out-of-place residuals (see encode_ids)."""
    from comfy.ldm.modules.attention import optimized_attention_for_device

    n = x.shape[1]
    causal = torch.full((n, n), -torch.finfo(x.dtype).max, dtype=x.dtype).triu_(1)
    attention = optimized_attention_for_device(x.device, mask=True, small_input=True)
    for layer in tm.encoder.layers[start:stop]:
        x = x + layer.self_attn(layer.layer_norm1(x), causal, attention)
        x = x + layer.mlp(layer.layer_norm2(x))
    return x


def encode_sdxl(clip, ids: dict, token_embeds: dict | None = None):
    """Differentiable (context (B, 77, wl + wg), pooled (B, wg)) for token ids {"l": (B, 77), "g": (B, 77)}, equal to
    what CLIPTextEncode gives an SDXL CLIP: each model's penultimate layer without the final norm, concatenated; the
    pooled vector is clip_g's last layer, final norm, at the first end token, through its text projection."""
    feats, pooled = [], None
    for key in ("l", "g"):
        model = text_model(clip, key)
        tm = model.text_model
        if token_embeds is None:
            x = tm.embeddings(ids[key], dtype=torch.float32)
        else:
            x = token_embeds[key] + tm.embeddings.position_embedding.weight[: ids[key].shape[1]]
        depth = len(tm.encoder.layers)
        h = _layers(tm, x, 0, depth - 1)
        feats.append(h)
        if key == "g":  # clip_l's last layer feeds nothing the UNet reads (ComfyUI's SDXL takes clip_g's pooled)
            y = tm.final_layer_norm(_layers(tm, h, depth - 1, depth))
            end = (ids[key] == tm.eos_token_id).int().argmax(dim=-1)
            pooled = model.text_projection(y[torch.arange(y.shape[0]), end])
    return torch.cat(feats, dim=-1), pooled


def sdpa_override(func, *args, **kwargs):
    """transformer_options["optimized_attention_override"]: PyTorch SDPA instead of ComfyUI's CPU default
    (sub-quadratic chunking, which saves memory the 8x8 latents never need and costs about half the speed)."""
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)
