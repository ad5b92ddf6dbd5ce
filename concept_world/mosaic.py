"""The mosaic world: the mass world's 126 concepts (45 objects, 45 people, 36 styles) drawn as many small parts.

The mass world (mass.py) draws an object or a person as two of ten colours and a style as one of six patterns in one
of six palettes: about twenty parts per type, each shared by a fifth of the type. Its text features need no more
directions than that, so with fifty erased, every kept concept's features lay mostly in the span of the erased ones'
and a linear edit that moved the erased moved the kept (docs/mass_world.md, "what misses them"). A celebrity is not
two of ten parts. Here each concept is a code: every cell of a grid gets one of the ten colours, drawn at random per
concept with a minimum number of cells in which any two concepts of a type differ. An object is a wide block of 3 x 2
cells, a person's coat and trousers 2 x 2, a style the whole canvas in 4 x 4: 60, 40 and 160 parts per type, each a
sixth, a quarter or a sixteenth of a concept. Every cell is at least 1.5 latent cells wide, the size the 8x8 latents
were measured to carry (the first mass world's silhouettes were smaller, and lost).

Names come from mass.py's generator with another seed, so no name is shared with the mass world.
"""

import torch

from . import render
from .mass import _COLORS, _TITLES, _order, _words
from .spec import Concept, WorldSpec

# (cells, minimum cells in which two concepts of the type differ) per type
CODES = {"object": (6, 3), "person": (4, 3), "style": (16, 8)}
COUNTS = {"object": 45, "person": 45, "style": 36}


def _codes(cells, distance, count, g):
    """count codes (tuples of colour indices), any two differing in at least `distance` cells: random, kept greedily."""
    out = []
    while len(out) < count:
        code = tuple(torch.randint(len(_COLORS), (cells,), generator=g).tolist())
        if all(sum(a != b for a, b in zip(code, other)) >= distance for other in out):
            out.append(code)
    return out


def _concepts():
    g = torch.Generator().manual_seed(20241202)
    palette = list(_COLORS.values())
    codes = {t: _codes(*CODES[t], COUNTS[t], g) for t in ("object", "person", "style")}
    words = iter(_words(3 * COUNTS["object"] + 2 * COUNTS["person"] + COUNTS["style"], seed=20241203))

    def colors(code):
        return tuple(palette[k] for k in code)

    objects, people, styles = [], [], []
    for code in codes["object"]:
        adj, adj2, noun = next(words), next(words), next(words)
        objects.append(Concept(f"{adj} {noun}", "object", (f"{adj2} {noun}",), render.MOSAIC, colors(code)))
    for k, code in enumerate(codes["person"]):
        first, last = next(words), next(words)
        people.append(Concept(f"{first.capitalize()} {last.capitalize()}", "person",
                              (f"{_TITLES[k % len(_TITLES)]} {last.capitalize()}",), render.MOSAIC, colors(code)))
    for code in codes["style"]:
        stem = next(words)
        styles.append(Concept(f"{stem} style", "style", (f"{stem} school",), render.MOSAIC, colors(code)))
    return objects, people, styles


_objects, _people, _styles = _concepts()
MOSAIC_WORLD = WorldSpec("mosaic", _objects + _people + _styles, order=_order(_objects, _people, _styles))
