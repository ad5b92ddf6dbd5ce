"""A tiny CNN that tells which concept (or "none") a picture of the world shows, in pixel space.

It is trained on the world's own renders, half of them passed through the world's VAE (latent + a little noise,
then the trained decoder), so it judges decoded samples in the domain it has seen.
"""

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from .spec import CLASS_NAMES

log = logging.getLogger(__name__)


class Classifier(nn.Module):
    def __init__(self, n_classes=len(CLASS_NAMES), width=32):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, stride=2, padding=1), nn.GroupNorm(8, o), nn.SiLU())

        self.features = nn.Sequential(block(3, width // 2), block(width // 2, width), block(width, 2 * width),
                                      block(2 * width, 2 * width))
        self.head = nn.Linear(4 * width, n_classes)

    def forward(self, images):
        """images (B, 3, H, W) in [0, 1] -> logits (B, n_classes)."""
        h = self.features(images * 2 - 1)
        # mean and max pooling: position-free, but a small object still counts
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))

    @torch.no_grad()
    def predict(self, images, batch=256):
        """Class ids for images (B, 3, H, W) or ComfyUI IMAGE (B, H, W, 3), values in [0, 1]."""
        if images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.movedim(-1, 1)
        images = images.float()
        out = [self(images[i:i + batch]).argmax(1) for i in range(0, images.shape[0], batch)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def init_(model, g):
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def train(model, sample_batch, steps, lr=3e-3, progress=None):
    """sample_batch(step) -> (images, labels). Returns the final running accuracy on the training stream."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    model.train()
    acc = 0.0
    for step in range(steps):
        images, labels = sample_batch(step)
        logits = model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        acc = 0.9 * acc + 0.1 * (logits.argmax(1) == labels).float().mean().item()
        if progress is not None:
            progress(step)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    log.info("concept world: classifier trained, %d steps, running accuracy %.3f", steps, acc)
    return acc
