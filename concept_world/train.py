"""Training the concept world: decoder, then UNet + text encoder jointly, then the classifier.

Everything is drawn from generators seeded by the world seed, so one seed gives one world. Training runs with
gradients even when called from a node (ComfyUI executes nodes under inference_mode).
"""

import logging
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from . import autoencoder, classifier, cpu, nets, render
from .spec import STANDARD, named

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    name: str
    ae_steps: int
    ae_batch: int
    diff_steps: int
    diff_batch: int
    cls_steps: int
    cls_batch: int
    recon_pool: int
    eval_renders: int  # held-out renders per target for the classifier's accuracy
    lr: float = 1e-3
    world: str = "standard"  # which concepts (spec.named): "standard" (20), "mass" (mass.py) or "mosaic" (mosaic.py)
    text_width: int | None = None  # the text features' (the UNet's context) width; None: nets.TEXT_WIDTH

    @property
    def spec(self):
        return named(self.world)


MASS_TEXT_WIDTH = 256
MOSAIC_TEXT_WIDTH = 128  # the mosaic world is measured at 128 wide (docs/mosaic_world.md); 256 is not measured there
# what a saved world's recipe must match to load as today's (world.load); eval_renders only measures the classifier
RECIPE_KEYS = ("ae_steps", "ae_batch", "diff_steps", "diff_batch", "cls_steps", "cls_batch", "recon_pool", "lr")
PRESETS = {
    "full": Preset("full", ae_steps=160, ae_batch=32, diff_steps=1300, diff_batch=64, cls_steps=300, cls_batch=64,
                   recon_pool=768, eval_renders=8),
    # seconds: only checks that every phase runs and the result loads into ComfyUI
    "smoke": Preset("smoke", ae_steps=2, ae_batch=4, diff_steps=3, diff_batch=8, cls_steps=3, cls_batch=8,
                    recon_pool=8, eval_renders=1),
    # the mass world (mass.py, 126 concepts). Its classifier tells 127 classes apart, which takes 5x the standard
    # world's steps (300 steps: 59 % held out on renders, 1500: 99.6 %, measured). Its text is 256 wide, twice as many
    # as it has concepts, as CLIP-L's 768 are 3.8x the paper's 200 celebrities: at 64 every erased concept's features
    # lay inside the span of the kept ones', so no linear edit could move one and hold the rest, and at 128 erasing
    # 50 lost about half the kept people and styles to their erased neighbours (docs/mass_world.md). A diffusion step
    # at 256 wide takes 0.70 s on one thread without bf16 (128 wide: 0.43 s), so 2000 steps keep training under 30
    # minutes
    "mass": Preset("mass", ae_steps=300, ae_batch=32, diff_steps=2000, diff_batch=64, cls_steps=1500, cls_batch=64,
                   recon_pool=1536, eval_renders=4, world="mass", text_width=MASS_TEXT_WIDTH),
    "mass_smoke": Preset("mass_smoke", ae_steps=2, ae_batch=4, diff_steps=3, diff_batch=8, cls_steps=3, cls_batch=8,
                         recon_pool=8, eval_renders=1, world="mass", text_width=MASS_TEXT_WIDTH),
    # the mass world's concepts drawn as codes of many parts (mosaic.py), on the mass world's recipe before it widened
    # (3000 diffusion steps, text 128 wide)
    "mosaic": Preset("mosaic", ae_steps=300, ae_batch=32, diff_steps=3000, diff_batch=64, cls_steps=1500, cls_batch=64,
                     recon_pool=1536, eval_renders=4, world="mosaic", text_width=MOSAIC_TEXT_WIDTH),
    "mosaic_smoke": Preset("mosaic_smoke", ae_steps=2, ae_batch=4, diff_steps=3, diff_batch=8, cls_steps=3,
                           cls_batch=8, recon_pool=8, eval_renders=1, world="mosaic", text_width=MOSAIC_TEXT_WIDTH),
}

UNCOND_P = 0.1  # prompt dropout to "" so classifier-free guidance works
MIN_SNR_GAMMA = 5.0
# CLIP's text features were trained (contrastively) to tell image contents apart; the diffusion loss alone left the
# world's 64-wide ones crowded (kept concepts up to 0.75 cosine from erased ones, so an edit to one moved its
# neighbours). A linear read-out of each prompt's end-token feature that must name what the prompt draws plays CLIP's
# part; its weight keeps it below the diffusion loss from the start (0.02 x ln 24 = 0.06 against about 0.2).
TEXT_CLASS_WEIGHT = 0.02
# Stable Diffusion's cross-attention is sharp: the start token takes 0.9-0.99 of every pixel's attention, and a
# concept's own words take a share where the concept is drawn (prompt-to-prompt and DAAM measure this on SD 1.4).
# A 64-wide toy trained for 1300 steps never gets there on its own: its attention stayed spread over 34-68 of the 77
# tokens, its key projections where they started, and so there was nothing sharp for MACE's attention loss to cut
# (docs/world_attention.md). This term asks the world for SD's shape: the cross-entropy of each pixel's attention
# (averaged over heads) against a target that puts everything on the start token, except inside the drawn concept's
# region (the whole picture for a style), where the concept's own words take OBJECT_SHARE.
ATTENTION_PRIOR_WEIGHT = 0.0  # off in the shipped worlds: measured worse for MACE (docs/world_attention.md)
OBJECT_SHARE = 0.4
CONTEXT_LENGTH = 77
# True starts the SD1.5 world's text features at CLIP-L's norm (nets.CONTEXT_NORM_WIDTH); off in the shipped worlds
CONTEXT_NORM = False
# Adam moves each weight entry by about its learning rate per step, whatever the entry's size, so how far a LoRA step
# moves a key relative to the key is lr / (the key projection's entry size), independent of width and token norm.
# SD1.5's to_k/to_v read 768-wide CLIP features and start (PyTorch's Linear default) at std 1/sqrt(3 x 768) = 0.021;
# the 64-wide world's start at 1/sqrt(64) = 0.125, six times larger, and never learn away from it (1300 steps at lr
# 1e-3: docs/world_attention.md). A number here starts the world's cross-attention key and value projections at that
# std instead (trial; None: the fan-in start of the shipped worlds).
KEY_VALUE_STD = None


def training_options() -> dict:
    """The trial options above, and the thread count, as a world file records them: a cached world trained with other
    options is stale even under the same version, so load_or_train retrains it rather than testing the wrong world.
    Files written before these options existed carry none and were trained with the trial options off and with as
    many threads as the machine's load left idle (so their worlds differed with the load: they are retrained)."""
    out = {"attention_prior": ATTENTION_PRIOR_WEIGHT, "object_share": OBJECT_SHARE if ATTENTION_PRIOR_WEIGHT else 0.0,
           "context_norm": bool(CONTEXT_NORM), "threads": TRAINING_THREADS}
    if KEY_VALUE_STD:  # recorded only when set, so the worlds trained before it existed stay current
        out["key_value_std"] = float(KEY_VALUE_STD)
    return out


OPTIONS_OFF = {"attention_prior": 0.0, "object_share": 0.0, "context_norm": False}


def _phase_gen(seed, phase):
    return torch.Generator().manual_seed(seed * 7919 + phase)


def _target_weights(sp=STANDARD):
    # concepts 80 %, each generic 5 %, blank background 5 %
    n = len(sp.CONCEPTS)
    w = torch.full((render.n_targets(sp),), 0.05)
    w[:n] = 0.8 / n
    return w


def sample_targets(g, n, sp=STANDARD):
    return torch.multinomial(_target_weights(sp), n, replacement=True, generator=g).tolist()


def prompt_table(sp=STANDARD):
    """Per render target, the prompts it is trained under (concept names, or their type's anchors, in templates)."""
    return [[p for p, _ in group] for group in _phrase_table(sp)]


def _phrase_table(sp=STANDARD):
    """prompt_table with each prompt's drawn phrase (the concept's name or the anchor): [[(prompt, phrase)]]."""
    table = []
    for c in sp.CONCEPTS:
        table.append([(t.format(n), n) for n in c.names for t in sp.TEMPLATES[c.concept_type]])
    for ctype in ("object", "person", "style"):
        table.append([(t.format(a), a) for a in sp.ANCHORS[ctype] for t in sp.TEMPLATES[ctype]])
    table.append([("", "")])  # blank background: only the empty prompt
    return table


def phrase_positions(clip, prompt: str, phrase: str) -> list[int]:
    """Token positions of `phrase` inside `prompt` (the first occurrence), as the world's tokenizer splits them."""
    if not phrase:
        return []
    ids = nets.token_ids(clip, prompt)
    words = nets.token_ids(clip, phrase)
    words = words[1:words.index(words[-1])]  # between the start token and the first end/pad token
    for i in range(1, len(ids) - len(words) + 1):
        if ids[i:i + len(words)] == words:
            return list(range(i, i + len(words)))
    raise ValueError(f"{phrase!r} not found in the tokens of {prompt!r}")


class _AttentionRecorder:
    """optimized_attention_override for world training: PyTorch SDPA for self-attention, and for cross-attention
    (keys: the 77 text tokens) the softmax computed as a tensor, so its head-averaged maps (batch, pixels, 77)
    can enter the attention prior with their gradient."""

    def __init__(self):
        self.maps = []

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        if k.shape[1] != CONTEXT_LENGTH or kwargs.get("skip_reshape") or (args and args[0] is not None):
            return nets.sdpa_override(func, q, k, v, heads, *args, **kwargs)
        b, n, inner = q.shape
        d = inner // heads
        qh, kh, vh = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        probs = torch.softmax((qh @ kh.transpose(-1, -2)).float() * d ** -0.5, dim=-1)
        self.maps.append(probs.mean(1))
        return (probs.to(vh.dtype) @ vh).transpose(1, 2).reshape(b, n, inner)


def attention_prior_loss(maps, masks, objects):
    """Cross-entropy of the recorded head-averaged cross-attention maps [(B, pixels, 77)] against the target (see
    ATTENTION_PRIOR_WEIGHT). masks (B, 1, H, W) in [0, 1]: where the drawn concept is; objects (B, 77): each sample's
    phrase tokens, summing to 1 (all zero for a prompt without one: the empty prompt, dropped for guidance)."""
    terms = []
    has = objects.sum(-1).view(-1, 1, 1)
    start = torch.zeros_like(objects)
    start[:, 0] = 1.0
    for p in maps:
        side = int(round(p.shape[1] ** 0.5))
        m = F.adaptive_avg_pool2d(masks, (side, side)).flatten(1).unsqueeze(-1) * has  # (B, pixels, 1)
        target = (1 - OBJECT_SHARE * m) * start[:, None] + OBJECT_SHARE * m * objects[:, None]
        terms.append(-(target * (p + 1e-8).log()).sum(-1).mean())
    return torch.stack(terms).mean()


class _Hooks:
    """Progress bar and interruption, when running inside ComfyUI's executor."""

    def __init__(self, total):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(total)

    def __call__(self, _step):
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update(1)


def _train_diffusion(base, clip, preset, g, hooks):
    unet = base.diffusion_model
    text = clip.cond_stage_model
    sp = preset.spec
    phrases = _phrase_table(sp)
    table = [[p for p, _ in group] for group in phrases]
    keys = nets.text_keys(clip)
    sdxl = keys == ["l", "g"]
    ids = {p: nets.all_token_ids(clip, p) for prompts in table for p in prompts}
    # the world uses ~100 of the 49408 tokens: train a compact copy of their rows per text model (a dense Adam step
    # over the whole table would cost more than the text encoder itself) and write it back at the end
    tables, vocabs, remaps, compacts = {}, {}, {}, {}
    for key in keys:
        tables[key] = nets.text_model(clip, key).text_model.embeddings.token_embedding.weight
        vocabs[key] = sorted({i for seq in ids.values() for i in seq[key]})
        remaps[key] = torch.zeros(tables[key].shape[0], dtype=torch.long)
        remaps[key][vocabs[key]] = torch.arange(len(vocabs[key]))
        compacts[key] = torch.nn.Parameter(tables[key].detach()[vocabs[key]].clone())
    table_ids = {id(t) for t in tables.values()}
    params = (list(unet.parameters()) + [p for p in text.parameters() if id(p) not in table_ids]
              + list(compacts.values()))
    head = None  # the text read-out (see TEXT_CLASS_WEIGHT); a training aid only, not saved
    if TEXT_CLASS_WEIGHT:
        target_of = {p: t for t, prompts in enumerate(table) for p in prompts}
        end_id = clip.tokenizer.clip_l.end_token
        width = sum(c.shape[1] for c in compacts.values())  # the context: the text models' widths side by side
        head = torch.nn.Linear(width, len(table))
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) / width ** 0.5)
            head.bias.zero_()
        params += list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    unet.train()
    text.train()
    opt = torch.optim.AdamW(params, lr=preset.lr, betas=(0.9, 0.99), weight_decay=0.0)
    total = max(preset.diff_steps, 1)
    # OneCycleLR divides by zero where its warm-up would end at step 0 (5 % of exactly 20 steps): warm up 2 steps there
    warm = 0.05 if abs(0.05 * total - 1) > 1e-9 else 2 / total
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=preset.lr, total_steps=total, pct_start=warm)
    ema = [p.detach().clone() for p in params]
    sigmas = base.model_sampling.sigmas.float()
    b = preset.diff_batch
    recorder = _AttentionRecorder() if ATTENTION_PRIOR_WEIGHT else None
    topts = {"optimized_attention_override": recorder or nets.sdpa_override}
    objects = {}  # prompt -> (77,) weights on its phrase's tokens
    for group in phrases:
        for p, phrase in group:
            w = torch.zeros(CONTEXT_LENGTH)
            where = phrase_positions(clip, p, phrase)
            if where:
                w[where] = 1.0 / len(where)
            objects[p] = w
    objects[""] = torch.zeros(CONTEXT_LENGTH)
    loss_ema = prior_ema = None
    for step in range(preset.diff_steps):
        targets = sample_targets(g, b, sp)
        images, masks = render.render(targets, g, sp=sp)
        z = autoencoder.latent_of(images)
        drop = (torch.rand(b, generator=g) < UNCOND_P).tolist()
        prompts = []
        for t, d in zip(targets, drop):
            choices = table[t]
            prompts.append("" if d else choices[int(torch.randint(len(choices), (), generator=g))])
        uniq = sorted(set(prompts))
        uniq_ids = {k: torch.tensor([ids[p][k] for p in uniq]) for k in keys}
        embeds = {k: compacts[k][remaps[k][uniq_ids[k]]] for k in keys}
        if sdxl:
            ctx_u, pooled_u = nets.encode_sdxl(clip, uniq_ids, embeds)
        else:
            ctx_u = nets.encode_ids(clip, uniq_ids["l"], embeds["l"])
        which = torch.tensor([uniq.index(p) for p in prompts])
        ctx = ctx_u[which]
        # SDXL's y as sampling builds it (comfy.samplers passes the latent's size: 64 px): pooled vector + sizes
        y = base.encode_adm(pooled_output=pooled_u[which], width=64, height=64) if sdxl else None
        if head is not None:
            ends = torch.tensor([ids[p]["l"].index(end_id) for p in uniq])
            logits = head(ctx_u[torch.arange(len(uniq)), ends])
            text_loss = F.cross_entropy(logits, torch.tensor([target_of[p] for p in uniq]))
        t_idx = torch.randint(0, len(sigmas), (b,), generator=g)
        sigma = sigmas[t_idx].view(b, 1, 1, 1)
        eps = torch.randn(z.shape, generator=g)
        # input scaling as ComfyUI's ModelSamplingDiscrete feeds the UNet; target v, so that its
        # V_PREDICTION.calculate_denoised(sigma, v, x) gives back z
        scale = (sigma**2 + 1).sqrt()
        x_in = (z + sigma * eps) / scale
        v = (eps - sigma * z) / scale
        if recorder is not None:
            recorder.maps.clear()
        pred = unet(x_in, t_idx.float(), context=ctx, y=y, transformer_options=topts)
        # the image error counts clamp(SNR, 1, 5) times (v-MSE counts it SNR + 1 times): min-SNR-5 (Hang et al.
        # 2023) keeps nearly clean steps from dominating, the floor of 1 (truncated SNR, Salimans & Ho 2022) keeps
        # the noisy steps, which decide what is drawn where, from being ignored
        snr = sigma.view(b) ** -2
        weight = snr.clamp(min=1.0, max=MIN_SNR_GAMMA) / (snr + 1)
        loss = (weight * (pred.float() - v).pow(2).mean((1, 2, 3))).mean()
        if head is not None:
            loss = loss + TEXT_CLASS_WEIGHT * text_loss
        if recorder is not None:
            prior = attention_prior_loss(recorder.maps, masks, torch.stack([objects[p] for p in prompts]))
            loss = loss + ATTENTION_PRIOR_WEIGHT * prior
            recorder.maps.clear()
            prior_ema = prior.item() if prior_ema is None else 0.98 * prior_ema + 0.02 * prior.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        if (step + 1) % max(preset.diff_steps // 4, 1) == 0:
            log.info("concept world: diffusion step %d/%d loss %.4f (attention prior %.3f)", step + 1,
                     preset.diff_steps, loss_ema, prior_ema or 0.0)
        hooks(step)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
            p.requires_grad_(False)
        for key in keys:
            tables[key][vocabs[key]] = compacts[key].detach()
    unet.eval()
    text.eval()
    return loss_ema


def _recon_pool(taesd, n, g, sp=STANDARD, batch=64):
    images, labels = [], []
    with torch.no_grad():
        for i in range(0, n, batch):
            targets = sample_targets(g, min(batch, n - i), sp)
            x, _ = render.render(targets, g, sp=sp)
            z = autoencoder.latent_of(x)
            # sampled latents are never exact: the classifier sees the decoder's rendering of noisy ones too
            z = z + torch.rand(z.shape[0], 1, 1, 1, generator=g) * 0.3 * torch.randn(z.shape, generator=g)
            with cpu.autocast():
                out = autoencoder.decode01(taesd, z)
            images.append(out.float().clamp(0, 1).half())
            labels += [render.class_of(t, sp) for t in targets]
    return torch.cat(images), torch.tensor(labels)


def _jitter(images, g):
    """Saturation, contrast and brightness jitter and some blur: guidance strength shifts exactly these, so the
    classifier must judge shape and hue, not how vivid a sample came out."""
    n = images.shape[0]

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=g)

    grey = images.mean(1, keepdim=True)
    images = grey + (images - grey) * u(0.7, 1.5)
    images = (images - 0.5) * u(0.8, 1.25) + 0.5 + u(-0.06, 0.06)
    blurred = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    images = torch.where(torch.rand(n, 1, 1, 1, generator=g) < 0.3, blurred, images)
    return images.clamp(0, 1)


def classifier_accuracy(model, taesd, g, per_target, sp=STANDARD):
    """Held-out accuracy on fresh renders and on their VAE round trips, overall and per concept type."""
    targets = [t for t in range(render.n_targets(sp)) for _ in range(per_target)]
    with torch.no_grad():
        x, _ = render.render(targets, g, sp=sp)
        rec = autoencoder.decode01(taesd, autoencoder.latent_of(x))
        labels = torch.tensor([render.class_of(t, sp) for t in targets])
        out = {}
        for kind, imgs in (("render", x), ("vae", rec)):
            ok = model.predict(imgs) == labels
            out[kind] = round(ok.float().mean().item(), 4)
            for ctype in ("object", "person", "style", "none"):
                sel = torch.tensor([render.concept_type_of(t, sp) == ctype if ctype != "none" else t >= sp.NONE
                                    for t in targets])
                out[f"{kind}_{ctype}"] = round(ok[sel].float().mean().item(), 4)
    return out


# The world trains on one thread, always. Another thread count sums in another order (1 and 2 threads differ by 1e-4
# in the weights after 30 steps, and training amplifies it), and the count used to follow the machine's load, so the
# same seed gave a different world, and different erasure figures, on a busy machine. One thread is also the fastest
# on shared cores (tiny ops: an OpenMP thread whose core is busy stalls every op; 2 threads on 2 loaded cores ran
# 4-30x slower than 1).
TRAINING_THREADS = 1


def _training_threads():
    return TRAINING_THREADS


def train_world(seed: int, preset: Preset, configs: tuple[dict, dict] | None = None):
    """Train every part: (taesd, base_model, clip, classifier, metrics). configs: (unet_config, clip_config), default
    nets.configs() at the preset's text width. Runs with gradients even when the caller is under inference_mode (as
    ComfyUI's executor is)."""
    before = torch.get_num_threads()
    threads = _training_threads()
    log.info("concept world: training on %d thread(s), %s", threads, cpu.describe())
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            return _train_world(seed, preset, configs or nets.configs(preset.text_width))
    finally:
        torch.set_num_threads(before)


def _train_world(seed, preset, configs):
    hooks = _Hooks(preset.ae_steps + preset.diff_steps + preset.cls_steps)
    # the width actually trained (a caller's configs may override the preset's, as eval_world --text-width does)
    width = configs[1].get("hidden_size", preset.text_width)
    metrics = {"preset": dict(asdict(preset), text_width=width), "seed": seed}
    t_all, cpu_all = time.perf_counter(), time.process_time()

    t0 = time.perf_counter()
    g = _phase_gen(seed, 1)
    taesd = autoencoder.build_taesd(g)
    sp = preset.spec
    loss = autoencoder.train_decoder(taesd, lambda n: render.render(sample_targets(g, n, sp), g, sp=sp)[0],
                                     preset.ae_steps, g, batch=preset.ae_batch, progress=hooks)
    metrics["decoder_loss"] = round(loss or 0.0, 5)
    metrics["time_decoder_s"] = round(time.perf_counter() - t0, 1)
    log.info("concept world: phase 1/3 decoder done in %.0f s", metrics["time_decoder_s"])

    t0 = time.perf_counter()
    g = _phase_gen(seed, 2)
    base = nets.new_base_model(configs[0])
    nets.init_unet_(base.diffusion_model, g, KEY_VALUE_STD)
    if nets.family_of(configs[0]) == "sdxl":
        nets.init_label_emb_(base.diffusion_model, g)
    clip = nets.new_clip(configs[1])
    sdxl = nets.family_of(configs[0]) == "sdxl"
    # the SD1.5 world's context is the final norm's output (see nets.CONTEXT_NORM_WIDTH); SDXL's is the penultimate
    # layer's residual stream, which that norm does not touch (it feeds only the pooled vector there)
    gain = 1.0 if sdxl or not CONTEXT_NORM else (nets.CONTEXT_NORM_WIDTH / configs[1]["hidden_size"]) ** 0.5
    nets.init_clip_(clip.cond_stage_model, g, gain)
    loss = _train_diffusion(base, clip, preset, g, hooks)
    metrics["diffusion_loss"] = round(loss or 0.0, 5)
    metrics["time_diffusion_s"] = round(time.perf_counter() - t0, 1)
    log.info("concept world: phase 2/3 UNet + text encoder done in %.0f s (loss %.4f)",
             metrics["time_diffusion_s"], loss or 0.0)

    t0 = time.perf_counter()
    g = _phase_gen(seed, 3)
    pool_x, pool_y = _recon_pool(taesd, preset.recon_pool, g, sp)
    cls = classifier.Classifier(len(sp.CLASS_NAMES))
    classifier.init_(cls, g)
    half = preset.cls_batch // 2

    def batch(_step):
        targets = sample_targets(g, preset.cls_batch - half, sp)
        x, _ = render.render(targets, g, sp=sp)
        idx = torch.randint(pool_x.shape[0], (half,), generator=g)
        images = _jitter(torch.cat([x, pool_x[idx].float()]), g)
        labels = torch.cat([torch.tensor([render.class_of(t, sp) for t in targets]), pool_y[idx]])
        return images, labels

    classifier.train(cls, batch, preset.cls_steps, progress=hooks)
    metrics["classifier"] = classifier_accuracy(cls, taesd, _phase_gen(seed, 4), preset.eval_renders, sp)
    metrics["time_classifier_s"] = round(time.perf_counter() - t0, 1)
    metrics["time_train_s"] = round(time.perf_counter() - t_all, 1)
    # wall time depends on what else runs on the machine; CPU seconds / threads is the quiet-machine figure
    metrics["cpu_train_s"] = round(time.process_time() - cpu_all, 1)
    metrics["threads"] = torch.get_num_threads()
    metrics["cpu_bf16"] = cpu.native_bf16()
    log.info("concept world: phase 3/3 classifier done in %.0f s, held-out accuracy %s; total %.0f s",
             metrics["time_classifier_s"], metrics["classifier"], metrics["time_train_s"])
    return taesd, base, clip, cls, metrics
