"""Concept masks without a segmenter: the world's objects and people stand on a plain background.

The background colour is the median of the border pixels; whatever differs from it clearly is foreground.
This plays the part Grounded-SAM plays in the paper (styles take the whole image instead).
"""

import torch
import torch.nn.functional as F


def foreground(images, threshold=0.12, grow=1):
    """Masks (..., H, W) in {0, 1} for IMAGE tensors (..., H, W, 3) in [0, 1]."""
    lead = images.shape[:-3]
    x = images.reshape(-1, *images.shape[-3:]).float()
    border = torch.cat([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], 1)  # (B, 4W, 3)
    bg = border.median(1).values[:, None, None, :]
    m = ((x - bg).abs().amax(-1) > threshold).float()
    if grow:
        m = F.max_pool2d(m[:, None], 2 * grow + 1, stride=1, padding=grow)[:, 0]
    return m.reshape(*lead, *m.shape[-2:])
