"""Drawing the concept world's pictures: antialiased shapes from signed distances, plain torch, one image at a time.

A target is a concept index (0..N-1) or one of the generic kinds below (N + k), N being the world's number of
concepts (every function takes the world's spec, the standard world's by default). All randomness (position, size,
background, pattern phase) comes from the caller's torch.Generator, so a dataset is a function of a seed.
"""

import math

import torch

from .spec import CONCEPT_TYPES, STANDARD

# generic pictures, after the concepts: a grey object, a grey person, a plain painted canvas, an empty background
_GENERIC_KINDS = ("object", "person", "style", "blank")
N = len(STANDARD.CONCEPTS)
GENERIC_OBJECT, GENERIC_PERSON, GENERIC_ART, BLANK = N, N + 1, N + 2, N + 3  # the standard world's
GENERIC = {"object": GENERIC_OBJECT, "person": GENERIC_PERSON, "style": GENERIC_ART}
N_TARGETS = N + len(_GENERIC_KINDS)


def n_targets(sp=STANDARD) -> int:
    return len(sp.CONCEPTS) + len(_GENERIC_KINDS)


def generic(kind: str, sp=STANDARD) -> int:
    """The render target of a generic picture ("object", "person", "style" or "blank") in a world."""
    return len(sp.CONCEPTS) + _GENERIC_KINDS.index(kind)

_SKIN = (0.93, 0.75, 0.60)
TWO_TONE = "two-tone"  # an object's or a person's drawing of two colours (the mass world's)
MOSAIC = "mosaic"  # a grid of colour cells (the mosaic world's, mosaic.py): a block, a coat and trousers, a canvas
_OBJECT_SHAPES = ("disc", "square", "triangle", "cross", "dome", "diamond", "ring", "barrel")


def _u(g, lo, hi):
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _cover(d):
    # 1-pixel antialiasing from a signed distance in pixels
    return (0.5 - d).clamp(0.0, 1.0)


def _box(x, y, cx, cy, hx, hy, r=0.0):
    qx = (x - cx).abs() - (hx - r)
    qy = (y - cy).abs() - (hy - r)
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0) - r


def _convex(x, y, pts):
    # max of signed distances to the edges of a counter-clockwise (in image coords: clockwise) convex polygon
    d = None
    n = len(pts)
    for i in range(n):
        (x0, y0), (x1, y1) = pts[i], pts[(i + 1) % n]
        ex, ey = x1 - x0, y1 - y0
        norm = math.hypot(ex, ey)
        # outward normal for vertices listed clockwise on screen (y down)
        nx, ny = ey / norm, -ex / norm
        di = (x - x0) * nx + (y - y0) * ny
        d = di if d is None else torch.maximum(d, di)
    return d


def _shape_sdf(shape, x, y, cx, cy, r):
    if shape == "disc":
        return torch.hypot(x - cx, y - cy) - r
    if shape == "square":
        return _box(x, y, cx, cy, 0.85 * r, 0.85 * r, 2.0)
    if shape == "triangle":
        return _convex(x, y, [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)])
    if shape == "cross":
        w = 0.34 * r
        return torch.minimum(_box(x, y, cx, cy, w, r), _box(x, y, cx, cy, r, w))
    if shape == "dome":  # a half disc, larger so its area matches the others
        cy2, r2 = cy + 0.5 * r, 1.25 * r
        return torch.maximum(torch.hypot(x - cx, y - cy2) - r2, y - cy2)
    if shape == "diamond":
        return _convex(x, y, [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)])
    if shape == "ring":
        return (torch.hypot(x - cx, y - cy) - 0.72 * r).abs() - 0.26 * r
    if shape == "barrel":
        return _box(x, y, cx, cy, 0.66 * r, r, 3.0)
    raise ValueError(shape)


def _background(g, x):
    v = _u(g, 0.72, 0.90)
    tint = torch.tensor([_u(g, -0.04, 0.04) for _ in range(3)])
    return (v + tint).view(3, 1, 1).expand(3, *x.shape).clone()


def _paint(img, a, color):
    """Paint `color` (an RGB triple, or a (3, H, W) map of them) where the coverage `a` says."""
    c = torch.as_tensor(color, dtype=img.dtype)
    c = c.view(3, 1, 1) if c.dim() == 1 else c
    return img * (1 - a) + c * a


def _object(g, img, x, y, shape, colors):
    size = img.shape[-1]
    r = _u(g, 9.0, 15.0) * size / 64
    cx, cy = _u(g, r + 2, size - r - 2), _u(g, r + 2, size - r - 2)
    a = _cover(_shape_sdf(shape, x, y, cx, cy, r))
    img = _paint(img, a, colors[0])
    if shape == "barrel":  # two dark hoops across the body
        band = torch.minimum((y - (cy - 0.45 * r)).abs(), (y - (cy + 0.45 * r)).abs()) - 1.6
        img = _paint(img, a * _cover(band), colors[1])
    return img, a


def _figure(g, x, y, size, heights, half_width, head):
    """A person's placement and head: (h, cx, head, hair cap, body top, body bottom). heights: the figure's height
    range at 64 px; half_width and head: its half width and head radius as shares of the height."""
    h = _u(g, *heights) * size / 64
    half = half_width * h
    cx = _u(g, half + 2, size - half - 2)
    top = _u(g, 2, size - h - 2)
    rh = head * h
    hcy = top + rh
    disc = _cover(torch.hypot(x - cx, y - hcy) - rh)
    cap = disc * _cover(y - (hcy - 0.2 * rh))
    return h, cx, disc, cap, top + 2 * rh + 1, top + h


def _person(g, img, x, y, cut, hair, clothes):
    h, cx, head, cap, b0, b1 = _figure(g, x, y, img.shape[-1], (30.0, 42.0), 0.36, 0.16)
    if cut == "dress":  # widening to the hem
        t = ((y - b0) / (b1 - b0)).clamp(0, 1)
        hw = 0.17 * h + 0.19 * h * t
        body = _cover(torch.maximum((x - cx).abs() - hw, torch.maximum(b0 - y, y - b1)))
    else:  # suit: straight body
        body = _cover(_box(x, y, cx, (b0 + b1) / 2, 0.24 * h, (b1 - b0) / 2, 1.5))
    img = _paint(img, head, _SKIN)
    img = _paint(img, cap, hair)
    img = _paint(img, body, clothes)
    return img, torch.maximum(head, body)


def _two_tone_object(g, img, x, y, colors):
    """The mass world's objects: a wide rounded block, its left half one colour and its right half another. Two large
    areas of colour are what the world's 8x8 latents carry; its first mass world told objects apart by silhouette and
    the model drew the right one 36 % of the time (docs/mass_world.md)."""
    size = img.shape[-1]
    r = _u(g, 12.0, 16.0) * size / 64
    hx, hy = 1.3 * r, 0.8 * r
    cx, cy = _u(g, hx + 2, size - hx - 2), _u(g, hy + 2, size - hy - 2)
    a = _cover(_box(x, y, cx, cy, hx, hy, 3.0))
    img = _paint(img, a, colors[0])
    img = _paint(img, a * _cover(cx - x), colors[1])
    return img, a


def _two_tone_person(g, img, x, y, colors):
    """The mass world's people: a head over a straight body whose upper half (the coat) is one colour and lower half
    (the trousers) another, for the same reason as _two_tone_object (hair and cut were too small to draw)."""
    h, cx, head, cap, b0, b1 = _figure(g, x, y, img.shape[-1], (36.0, 46.0), 0.34, 0.14)
    body = _cover(_box(x, y, cx, (b0 + b1) / 2, 0.3 * h, (b1 - b0) / 2, 1.5))
    mid = (b0 + b1) / 2
    img = _paint(img, head, _SKIN)
    img = _paint(img, cap, (0.10, 0.07, 0.05))
    img = _paint(img, body, colors[0])
    img = _paint(img, body * _cover(mid - y), colors[1])
    return img, torch.maximum(head, body)


def _grid(x, y, x0, y0, w, h, cols, rows, colors):
    """(3, H, W) colours of a cols x rows grid over the box from (x0, y0), w x h pixels, colors row by row; pixels
    outside the box take the nearest cell (the caller's mask cuts the shape)."""
    i = ((x - x0) / (w / cols)).floor().clamp(0, cols - 1).long()
    j = ((y - y0) / (h / rows)).floor().clamp(0, rows - 1).long()
    table = torch.as_tensor(colors, dtype=torch.float32)
    return table[(j * cols + i).flatten()].T.reshape(3, *x.shape)


def _mosaic_object(g, img, x, y, colors):
    """The mosaic world's objects: a wide rounded block of 3 x 2 colour cells, each 13-16 px wide (1.6-2 latent
    cells)."""
    size = img.shape[-1]
    r = _u(g, 15.0, 18.0) * size / 64
    hx, hy = 1.3 * r, 0.8 * r
    cx, cy = _u(g, hx + 2, size - hx - 2), _u(g, hy + 2, size - hy - 2)
    a = _cover(_box(x, y, cx, cy, hx, hy, 3.0))
    return _paint(img, a, _grid(x, y, cx - hx, cy - hy, 2 * hx, 2 * hy, 3, 2, colors)), a


def _mosaic_person(g, img, x, y, colors):
    """The mosaic world's people: _two_tone_person's figure with its coat and trousers each split in two down the
    middle, 2 x 2 colour cells of 11-14 px."""
    h, cx, head, cap, b0, b1 = _figure(g, x, y, img.shape[-1], (36.0, 46.0), 0.34, 0.14)
    body = _cover(_box(x, y, cx, (b0 + b1) / 2, 0.3 * h, (b1 - b0) / 2, 1.5))
    img = _paint(img, head, _SKIN)
    img = _paint(img, cap, (0.10, 0.07, 0.05))
    img = _paint(img, body, _grid(x, y, cx - 0.3 * h, b0, 0.6 * h, b1 - b0, 2, 2, colors))
    return img, torch.maximum(head, body)


def _mosaic_style(g, x, y, colors):
    """The mosaic world's styles: the whole canvas as 4 x 4 cells of colour, shifted by up to 3 px and lit a little
    brighter or darker per picture."""
    size = x.shape[-1]
    ox, oy = _u(g, -3.0, 3.0) * size / 64, _u(g, -3.0, 3.0) * size / 64
    img = _grid(x, y, ox, oy, size, size, 4, 4, colors)
    return img * _u(g, 0.94, 1.06)


def _style(g, x, y, kind, colors):
    size = x.shape[-1]
    base = torch.as_tensor(colors[0]).view(3, 1, 1).expand(3, size, size).clone()
    if kind == "dots":
        s = _u(g, 10.0, 14.0)
        ox, oy = _u(g, 0, s), _u(g, 0, s)
        u = torch.remainder(x - ox, s) - s / 2
        v = torch.remainder(y - oy, s) - s / 2
        return _paint(base, _cover(torch.hypot(u, v) - 0.3 * s), colors[1])
    if kind == "stripes":
        ang = _u(g, math.pi / 6, math.pi / 3)
        p = _u(g, 16.0, 22.0)
        f = torch.remainder(x * math.cos(ang) + y * math.sin(ang) + _u(g, 0, p), p)
        return _paint(base, _cover(((f - 0.2 * p).abs() - 0.2 * p)), colors[1])
    if kind == "checker":
        c = _u(g, 18.0, 26.0)
        s = torch.sin(math.pi * (x - _u(g, 0, c)) / c) * torch.sin(math.pi * (y - _u(g, 0, c)) / c)
        return _paint(base, (0.5 + 4 * s).clamp(0, 1), colors[1])
    if kind == "wash":
        img = base
        for k in range(3):
            cx, cy, sig = _u(g, 0, size), _u(g, 0, size), _u(g, 10.0, 18.0) * size / 64
            a = 0.75 * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sig**2))
            img = _paint(img, a, colors[1 + k % 2])
        return img
    if kind == "hatch":
        shade = 1 + _u(g, -0.08, 0.08) * (y - size / 2) / size
        img = base * shade
        tilt = _u(g, -0.2, 0.2)
        f = torch.remainder(y + tilt * x + _u(g, 0, 6), 6.0)
        return _paint(img, 0.75 * _cover((f - 1.5).abs() - 1.0), colors[1])
    if kind == "ripple":
        cx, cy = _u(g, -16, size + 16), _u(g, -16, size + 16)
        p = _u(g, 18.0, 24.0)
        a = 0.5 + 0.5 * torch.sin(2 * math.pi * torch.hypot(x - cx, y - cy) / p + _u(g, 0, 2 * math.pi))
        return _paint(base, a, colors[1])
    raise ValueError(kind)


def render_one(target, g, size=64, sp=STANDARD):
    """One picture (3, size, size) in [0, 1] and its concept mask (1, size, size)."""
    ys = (torch.arange(size, dtype=torch.float32) + 0.5)
    y, x = torch.meshgrid(ys, ys, indexing="ij")
    full = torch.ones(1, size, size)
    n = len(sp.CONCEPTS)
    if target < n:
        c = sp.CONCEPTS[target]
        if c.shape == MOSAIC and c.concept_type == "style":
            return _mosaic_style(g, x, y, c.colors).clamp(0, 1), full
        if c.shape == MOSAIC and c.concept_type == "object":
            img, m = _mosaic_object(g, _background(g, x), x, y, c.colors)
        elif c.shape == MOSAIC:
            img, m = _mosaic_person(g, _background(g, x), x, y, c.colors)
        elif c.shape == TWO_TONE and c.concept_type == "object":
            img, m = _two_tone_object(g, _background(g, x), x, y, c.colors)
        elif c.shape == TWO_TONE:
            img, m = _two_tone_person(g, _background(g, x), x, y, c.colors)
        elif c.concept_type == "object":
            img, m = _object(g, _background(g, x), x, y, c.shape, c.colors)
        elif c.concept_type == "person":
            img, m = _person(g, _background(g, x), x, y, c.shape, c.colors[0], c.colors[1])
        else:
            return _style(g, x, y, c.shape, c.colors).clamp(0, 1), full
        return img.clamp(0, 1), m.unsqueeze(0)
    kind = _GENERIC_KINDS[target - n] if n <= target < n + len(_GENERIC_KINDS) else None
    if kind == "object":
        shape = _OBJECT_SHAPES[int(torch.randint(len(_OBJECT_SHAPES), (), generator=g))]
        grey = _u(g, 0.40, 0.52)
        img, m = _object(g, _background(g, x), x, y, shape, ((grey,) * 3, (grey * 0.6,) * 3))
    elif kind == "person":
        cut = ("dress", "suit")[int(torch.randint(2, (), generator=g))]
        img, m = _person(g, _background(g, x), x, y, cut, (0.5, 0.5, 0.5), (0.58, 0.58, 0.58))
    elif kind == "style":
        img = _style(g, x, y, "wash", ((0.80, 0.78, 0.74), (0.55, 0.55, 0.55), (0.62, 0.60, 0.58)))
        m = torch.zeros(size, size)
    elif kind == "blank":
        img, m = _background(g, x), torch.zeros(size, size)
    else:
        raise ValueError(target)
    return img.clamp(0, 1), m.unsqueeze(0)


def render(targets, g, size=64, sp=STANDARD):
    """A batch: images (B, 3, size, size) in [0, 1] and masks (B, 1, size, size)."""
    out = [render_one(int(t), g, size, sp) for t in targets]
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])


def class_of(target: int, sp=STANDARD) -> int:
    """Classifier label of a render target: the concept, or NONE for every generic picture."""
    return min(target, sp.NONE)


def concept_type_of(target: int, sp=STANDARD) -> str:
    n = len(sp.CONCEPTS)
    if target < n:
        return sp.CONCEPTS[target].concept_type
    kind = _GENERIC_KINDS[target - n]
    return kind if kind in CONCEPT_TYPES else "none"


assert set(GENERIC) == set(CONCEPT_TYPES)
