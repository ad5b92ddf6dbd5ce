"""Labelled image grids and attention heatmaps as ComfyUI IMAGE tensors: torch and Pillow only, no host.

The Erasure Check and Attention Map nodes lay out what they sampled here, so the layout can be tested (and reused)
without a ComfyUI. An IMAGE is a float tensor (batch, height, width, 3) in [0, 1].
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
MIN_CELL = 128  # small images (the concept world's 64 px) are enlarged so labels and details stay legible
LINE_H = 12  # the default bitmap font is about 11 px tall
PAD = 4


@dataclass(frozen=True)
class GridLayout:
    """Where everything of a rows x cols grid goes: a label column on the left, a header row on top, a caption strip
    under every cell, a gap between cells and a wider gap after every `group` columns (e.g. before | after)."""
    rows: int
    cols: int
    cell_h: int
    cell_w: int
    label_w: int = 180
    header_lines: int = 2
    caption_lines: int = 0
    gap: int = 2
    group: int = 0
    group_gap: int = 12

    @property
    def header_h(self) -> int:
        return self.header_lines * LINE_H + 2 * PAD

    @property
    def caption_h(self) -> int:
        return self.caption_lines * LINE_H + (PAD if self.caption_lines else 0)

    @property
    def row_h(self) -> int:
        return self.cell_h + self.caption_h + self.gap

    def col_x(self, c: int) -> int:
        groups = c // self.group if self.group else 0
        return self.label_w + c * (self.cell_w + self.gap) + groups * self.group_gap

    def row_y(self, r: int) -> int:
        return self.header_h + r * self.row_h

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the whole picture."""
        return self.row_y(self.rows) + PAD, self.col_x(self.cols - 1) + self.cell_w + PAD

    def cell_box(self, r: int, c: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of cell (r, c), x1 and y1 exclusive."""
        x, y = self.col_x(c), self.row_y(r)
        return x, y, x + self.cell_w, y + self.cell_h

    def row_label_box(self, r: int) -> tuple[int, int, int, int]:
        y = self.row_y(r)
        return 0, y, self.label_w - PAD, y + self.cell_h

    def col_label_box(self, c: int) -> tuple[int, int, int, int]:
        x = self.col_x(c)
        return x, 0, x + self.cell_w, self.header_h

    def caption_box(self, r: int, c: int) -> tuple[int, int, int, int]:
        x0, _, x1, y1 = self.cell_box(r, c)
        return x0, y1, x1, y1 + self.caption_h


def font():
    return ImageFont.load_default()


def wrap(text: str, width: int, max_lines: int, fnt=None) -> list[str]:
    """Words of `text` on lines no wider than `width` pixels; the last line ends in '...' if the text is longer."""
    fnt = fnt or font()
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if fnt.getlength(trial) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    lines = [_fit(s, width, fnt) for s in lines]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _fit(lines[-1] + " ...", width, fnt, force_tail=True)
    return lines


def _fit(s: str, width: int, fnt, force_tail: bool = False) -> str:
    # one over-long word (a long name) is cut rather than spilling into the next cell
    if fnt.getlength(s) <= width and not (force_tail and not s.endswith("...")):
        return s
    while s and fnt.getlength(s + "...") > width:
        s = s[:-1]
    return s.rstrip(". ") + "..."


def cell_scale(h: int, w: int) -> int:
    return max(1, math.ceil(MIN_CELL / max(1, min(h, w))))


def grid(cells: torch.Tensor, row_labels: list[str], col_labels: list[str], captions=None, group: int = 0,
         label_w: int = 180) -> tuple[torch.Tensor, GridLayout]:
    """One labelled IMAGE (1, H, W, 3) of cells (rows, cols, h, w, 3) in [0, 1], and its layout.

    Small cells are enlarged by a whole factor (nearest neighbour, so pixels stay pixels); captions is an optional
    rows x cols list of short texts drawn under each cell."""
    if cells.ndim != 5 or cells.shape[-1] != 3:
        raise ValueError(f"cells must be (rows, cols, h, w, 3), got {tuple(cells.shape)}")
    rows, cols, h, w, _ = cells.shape
    if len(row_labels) != rows or len(col_labels) != cols:
        raise ValueError(f"{len(row_labels)} row and {len(col_labels)} column labels for a {rows} x {cols} grid")
    k = cell_scale(h, w)
    has_captions = captions is not None and any(t for row in captions for t in row)
    layout = GridLayout(rows, cols, h * k, w * k, label_w=label_w, caption_lines=1 if has_captions else 0,
                        group=group)
    height, width = layout.size
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    big = cells.detach().float().cpu().clamp(0, 1)
    if k > 1:
        big = big.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)
    pixels = (big * 255).round().to(torch.uint8).numpy()
    for r in range(rows):
        for c in range(cols):
            x0, y0, x1, y1 = layout.cell_box(r, c)
            canvas[y0:y1, x0:x1] = pixels[r, c]
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    fnt = font()
    for c, text in enumerate(col_labels):
        x0, y0, x1, _ = layout.col_label_box(c)
        for i, line in enumerate(wrap(text, x1 - x0, layout.header_lines, fnt)):
            draw.text((x0, y0 + PAD + i * LINE_H), line, fill=INK, font=fnt)
    max_lines = max(1, layout.cell_h // LINE_H)
    for r, text in enumerate(row_labels):
        x0, y0, x1, _ = layout.row_label_box(r)
        for i, line in enumerate(wrap(text, x1 - x0 - PAD, max_lines, fnt)):
            draw.text((x0 + PAD, y0 + i * LINE_H), line, fill=INK, font=fnt)
    if has_captions:
        for r in range(rows):
            for c in range(cols):
                if captions[r][c]:
                    x0, y0, x1, _ = layout.caption_box(r, c)
                    draw.text((x0, y0 + 1), _fit(captions[r][c], x1 - x0, fnt), fill=INK, font=fnt)
    out = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
    return out, layout


# ---------------------------------------------------------------- heatmaps

# Black -> red -> yellow -> white: brightness rises with the value, so more attention always reads brighter, also
# in grey scale and for colour-blind readers.
_STOPS = torch.tensor([[0.0, 0.0, 0.0], [0.85, 0.1, 0.0], [1.0, 0.85, 0.0], [1.0, 1.0, 1.0]])


def heat_colors(values: torch.Tensor) -> torch.Tensor:
    """(..., 3) RGB in [0, 1] for values in [0, 1] (clamped)."""
    v = values.float().clamp(0, 1) * (len(_STOPS) - 1)
    lo = v.floor().long().clamp(max=len(_STOPS) - 2)
    t = (v - lo.float()).unsqueeze(-1)
    return _STOPS[lo] * (1 - t) + _STOPS[lo + 1] * t


def luminance(rgb: torch.Tensor) -> torch.Tensor:
    """Rec. 601 brightness of (..., 3) RGB."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def resize_map(m: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(b, h, w) -> (b, H, W), bilinear: attention maps of coarse layers brought to the picture's size."""
    return F.interpolate(m.float().unsqueeze(1), size=hw, mode="bilinear", align_corners=False).squeeze(1)


def overlay(image: torch.Tensor, heat: torch.Tensor, vmax: float, alpha: float = 0.65) -> torch.Tensor:
    """An image (H, W, 3) with a heatmap (H, W) laid over it; values are scaled by vmax, shared by the pictures that
    are compared (before and after), so a fall in attention shows as a darker map, not a renormalised one."""
    colors = heat_colors(heat / max(float(vmax), 1e-12))
    return (1 - alpha) * image.float().clamp(0, 1) + alpha * colors


def mask_picture(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image with everything outside the mask (H, W in [0, 1]) dimmed to a quarter."""
    m = mask.float().clamp(0, 1).unsqueeze(-1)
    return image.float().clamp(0, 1) * (0.25 + 0.75 * m)
