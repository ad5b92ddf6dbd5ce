"""The world's VAE: ComfyUI's TAESD architecture with a hand-built encoder and a trained decoder.

Training a TAESD from scratch costs far more than the 2-CPU budget allows, so its weights start as an exact,
readable map. The encoder computes 8x8 block means of an opponent colour transform plus a texture channel
(block mean of |Laplacian| of grey): every block passes its input through (ReLU of a non-negative value),
each stride-2 conv averages 2x2. That encoder stays fixed, so `latent_of` below reproduces it with a few
tensor ops and the diffusion data costs nothing to encode. The decoder starts as the matching inverse
(nearest upsampling of the block colours) and is then trained to redraw the sharp picture.

Latents are "model space" (what the UNet sees): vae_scale = 0.18215 undoes SD1.5's latent scale factor, the
same convention ComfyUI uses when it loads a TAESD for SD1.x.
"""

import logging

import torch
import torch.nn.functional as F

from . import cpu

log = logging.getLogger(__name__)

SCALE_FACTOR = 0.18215  # comfy.latent_formats.SD15
# model-space latent = M @ [r, g, b, t] + OFFSET; t = block mean of |Laplacian(grey)|. Scaled so the world's
# latents have roughly unit spread (as SD's do): with smaller latents most diffusion timesteps carry no signal.
_M = torch.tensor([
    [2.0, 2.0, 2.0, 0.0],      # luminance
    [4.0, -4.0, 0.0, 0.0],     # red - green
    [2.0, 2.0, -4.0, 0.0],     # yellow - blue
    [0.0, 0.0, 0.0, 10.0],     # texture
])
_OFFSET = torch.tensor([-3.3, 0.0, 0.0, -1.5])
_LAP = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]])


def latent_of(images):
    """Model-space latents (B, 4, H/8, W/8) of images (B, 3, H, W) in [0, 1]; equals the TAESD encoder below."""
    grey_lap = F.conv2d(images, (_LAP / 3).expand(1, 3, 3, 3).to(images), padding=1).abs()
    feats = torch.cat([images, grey_lap], 1)
    pooled = F.avg_pool2d(feats, 8)
    return torch.einsum("ij,bjhw->bihw", _M.to(images), pooled) + _OFFSET.to(images).view(1, 4, 1, 1)


def _center(weight, rows, cols, values):
    weight[rows, cols, 1, 1] = values


def _init_random(module, g):
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim == 4:
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
            else:
                p.zero_()


def build_taesd(g):
    """ComfyUI's TAESD with the analytic encoder and the matching decoder start (not yet trained)."""
    from comfy.taesd.taesd import TAESD

    m = TAESD(latent_channels=4)
    _init_random(m, g)
    enc, dec = m.taesd_encoder, m.taesd_decoder
    eye = torch.arange(64)
    with torch.no_grad():
        # encoder: conv0 copies RGB and +/- Laplacian of grey (the next block's ReLU keeps |.| in two channels)
        w = torch.zeros_like(enc[0].weight)
        for c in range(3):
            w[c, c, 1, 1] = 1.0
            w[3, c] = _LAP / 3
            w[4, c] = -_LAP / 3
        enc[0].weight.copy_(w)
        enc[0].bias.zero_()
        for i in (2, 6, 10):  # stride-2 convs: mean of each 2x2 cell, channel by channel
            w = torch.zeros_like(enc[i].weight)
            w[eye, eye, 1:, 1:] = 0.25
            enc[i].weight.copy_(w)
        w = torch.zeros_like(enc[14].weight)
        _center(w, slice(None), slice(0, 4), _M)
        w[:, 4, 1, 1] = _M[:, 3]  # the other half of |Laplacian|
        enc[14].weight.copy_(w)
        enc[14].bias.copy_(_OFFSET)
        for i in (1, 3, 4, 5, 7, 8, 9, 11, 12, 13):  # residual paths off: each block is ReLU(identity)
            enc[i].conv[4].weight.zero_()
            enc[i].conv[4].bias.zero_()

        # decoder: conv1 inverts the colour transform, upsampling convs pass every channel through
        inv = torch.linalg.inv(_M)
        w = dec[1].weight
        w[:4].zero_()
        _center(w, slice(0, 4), slice(0, 4), inv)
        w[4:] *= 0.3
        dec[1].bias.zero_()
        dec[1].bias[:4].copy_(-inv @ _OFFSET)
        for i in (7, 12, 17):
            w = torch.zeros_like(dec[i].weight)
            w[eye, eye, 1, 1] = 1.0
            dec[i].weight.copy_(w)
        w = torch.zeros_like(dec[19].weight)
        w[eye[:3], eye[:3], 1, 1] = 1.0
        dec[19].weight.copy_(w)
        dec[19].bias.zero_()
        for i in (3, 4, 5, 8, 9, 10, 13, 14, 15, 18):
            dec[i].conv[4].weight.zero_()
            dec[i].conv[4].bias.zero_()
        m.vae_scale.fill_(SCALE_FACTOR)
        m.vae_shift.zero_()
    return m


def decode01(taesd, z):
    """Model-space latents -> images (B, 3, H, W) in [0, 1], as ComfyUI's VAE would give them."""
    return taesd.taesd_decoder(z).clamp(0, 1)


def train_decoder(taesd, sample_images, steps, g, batch=16, crop=4, lr=1e-3, progress=None):
    """Fit the decoder to redraw renders from their latents (encoder fixed). Returns the final loss.

    The decoder is convolutional, so it trains on crop x crop latent windows (8 crop pixels): a 4x4 window costs a
    quarter of a whole 8x8 latent and still sees every cell with its neighbours.
    """
    params = list(taesd.taesd_decoder.parameters())
    for p in taesd.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    loss_ema = None
    for step in range(steps):
        images = sample_images(batch)
        z = latent_of(images)
        n = z.shape[-1] - crop
        i, j = (int(v) for v in torch.randint(n + 1, (2,), generator=g))
        z = z[:, :, i:i + crop, j:j + crop]
        images = images[:, :, 8 * i:8 * (i + crop), 8 * j:8 * (j + crop)]
        # sampled latents are never exact: teach the decoder to tolerate a little noise
        z = z + 0.1 * torch.randn(z.shape, generator=g) * (torch.rand(batch, 1, 1, 1, generator=g) < 0.5)
        with cpu.autocast():
            out = taesd.taesd_decoder(z)
        out = out.float()
        loss = F.mse_loss(out, images) + 0.5 * F.l1_loss(out, images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        if progress is not None:
            progress(step)
    for p in params:
        p.requires_grad_(False)
    log.info("concept world: decoder trained, %d steps, loss %.4f", steps, loss_ema or 0.0)
    return loss_ema
