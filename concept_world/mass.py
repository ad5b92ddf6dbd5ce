"""The mass world: 126 concepts (48 objects, 48 people, 30 styles), for erasing 10 to 100 at once.

Every concept is a combination of drawing parts the standard world already has (render.py): an object is one of six
silhouettes in one of eight colours, a person one of two cuts with one of three hair colours and eight clothes
colours, a style one of six patterns in one of five palettes. The parts were chosen to stay apart at the world's
8x8 latents: the six silhouettes differ in outline (the square and the diamond, nearest the disc, are left out), and
the colours are far apart in hue.

Names are made up from syllables by a fixed generator, so the text encoder learns each from scratch, and every name
is used once. A concept has one synonym that keeps its distinctive word, as a celebrity's other name keeps the
surname: "Vel Drosani" / "Doctor Drosani", "tavren kolu" / "mirel kolu", "brisotal style" / "brisotal school".
"""

import itertools

import torch

from .spec import Concept, WorldSpec

_COLORS = {  # far apart in hue and away from the light grey backgrounds (render._background)
    "red": (0.86, 0.10, 0.10), "blue": (0.10, 0.25, 0.85), "yellow": (0.95, 0.80, 0.10), "green": (0.10, 0.62, 0.15),
    "purple": (0.55, 0.15, 0.72), "orange": (1.00, 0.50, 0.05), "teal": (0.05, 0.75, 0.80),
    "pink": (0.98, 0.45, 0.75),
}
_SHAPES = ("disc", "ring", "cross", "triangle", "barrel", "dome")
_CUTS = ("dress", "suit")
_HAIR = {"black": (0.06, 0.05, 0.05), "blond": (0.97, 0.86, 0.40), "ginger": (0.80, 0.32, 0.08)}
_PATTERNS = ("dots", "stripes", "checker", "wash", "hatch", "ripple")
_PALETTES = (  # (ground, ink, second ink for the wash)
    ((0.93, 0.90, 0.80), (0.15, 0.15, 0.22), (0.45, 0.40, 0.35)),
    ((0.14, 0.04, 0.24), (1.00, 0.25, 0.70), (0.60, 0.20, 0.90)),
    ((0.05, 0.35, 0.30), (0.95, 0.88, 0.70), (0.70, 0.95, 0.60)),
    ((0.05, 0.20, 0.52), (0.88, 0.94, 1.00), (0.40, 0.70, 1.00)),
    ((0.78, 0.62, 0.42), (0.33, 0.20, 0.10), (0.55, 0.30, 0.15)),
)
_TITLES = ("Doctor", "Mister", "Madame", "Professor", "Captain", "Miss")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "st", "th")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "n", "r", "l", "s")


def _words(count, seed=20240617):
    """count distinct made-up words of two or three syllables, from a fixed generator."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (), generator=g))]

    seen, out = set(), []
    while len(out) < count:
        syllables = 2 + int(torch.rand((), generator=g) < 0.4)
        word = "".join(pick(_ONSETS) + pick(_VOWELS) + pick(_CODAS) for _ in range(syllables))
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out


def _concepts():
    n_obj = len(_SHAPES) * len(_COLORS)
    n_per = len(_CUTS) * len(_HAIR) * len(_COLORS)
    n_sty = len(_PATTERNS) * len(_PALETTES)
    # objects: adjective + noun, the synonym another adjective; people: first + surname; styles: one word
    words = iter(_words(3 * n_obj + 2 * n_per + n_sty))
    objects, people, styles = [], [], []
    for shape, color in itertools.product(_SHAPES, _COLORS):
        adj, adj2, noun = next(words), next(words), next(words)
        body = _COLORS[color]
        band = tuple(0.45 * v for v in body)  # a barrel's hoops: the body's colour, darker
        objects.append(Concept(f"{adj} {noun}", "object", (f"{adj2} {noun}",), shape, (body, band)))
    for k, (cut, hair, color) in enumerate(itertools.product(_CUTS, _HAIR, _COLORS)):
        first, last = next(words), next(words)
        name = f"{first.capitalize()} {last.capitalize()}"
        people.append(Concept(name, "person", (f"{_TITLES[k % len(_TITLES)]} {last.capitalize()}",), cut,
                              (_HAIR[hair], _COLORS[color])))
    for pattern, palette in itertools.product(_PATTERNS, _PALETTES):
        stem = next(words)
        colors = palette if pattern == "wash" else palette[:2]
        styles.append(Concept(f"{stem} style", "style", (f"{stem} school",), pattern, colors))
    return objects, people, styles


def _order(objects, people, styles):
    """Types interleaved in the standard world's proportions, and within a type the parts spread, so the first ten
    erased already mix silhouettes, cuts and patterns."""
    def spread(items, stride):
        return [items[(i * stride) % len(items)] for i in range(len(items))]

    queues = [spread(people, 7), spread(objects, 7), spread(styles, 7)]
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0).name)
    return out


_objects, _people, _styles = _concepts()
MASS = WorldSpec("mass", _objects + _people + _styles, order=_order(_objects, _people, _styles))
