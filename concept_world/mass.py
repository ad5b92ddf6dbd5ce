"""The mass world: 126 concepts (45 objects, 45 people, 36 styles), for erasing 10 to 100 at once.

What the world's 8x8 latents carry is large areas of colour, so a concept here is a pair of colours more than a
shape. An object is a wide block whose halves have two of ten colours, a person a figure whose coat and trousers have
two of them (every pair once, the lighter-indexed colour left or on top), a style one of six patterns in one of six
palettes (the standard world's patterns). The first mass world told objects apart by silhouette and people by hair and
cut as the standard world does; its model drew the right object 36 % of the time and the right person 47 %, while its
styles reached 97 % (docs/mass_world.md).

Names are made up from syllables by a fixed generator, so the text encoder learns each from scratch, and every name
is used once. A concept has one synonym that keeps its distinctive word, as a celebrity's other name keeps the
surname: "Vel Drosani" / "Doctor Drosani", "tavren kolu" / "mirel kolu", "brisotal style" / "brisotal school".
"""

import itertools

import torch

from . import render
from .spec import Concept, WorldSpec

_COLORS = {  # far apart in hue or lightness, and away from the light grey backgrounds (render._background)
    "red": (0.86, 0.10, 0.10), "orange": (1.00, 0.50, 0.05), "yellow": (0.95, 0.85, 0.10),
    "green": (0.10, 0.62, 0.15), "teal": (0.05, 0.70, 0.75), "blue": (0.10, 0.25, 0.85),
    "purple": (0.55, 0.15, 0.72), "pink": (0.98, 0.45, 0.75), "brown": (0.45, 0.25, 0.08),
    "black": (0.08, 0.08, 0.10),
}
_PATTERNS = ("dots", "stripes", "checker", "wash", "hatch", "ripple")
_PALETTES = (  # (ground, ink, second ink for the wash)
    ((0.93, 0.90, 0.80), (0.15, 0.15, 0.22), (0.45, 0.40, 0.35)),
    ((0.14, 0.04, 0.24), (1.00, 0.25, 0.70), (0.60, 0.20, 0.90)),
    ((0.05, 0.35, 0.30), (0.95, 0.88, 0.70), (0.70, 0.95, 0.60)),
    ((0.05, 0.20, 0.52), (0.88, 0.94, 1.00), (0.40, 0.70, 1.00)),
    ((0.78, 0.62, 0.42), (0.33, 0.20, 0.10), (0.55, 0.30, 0.15)),
    ((0.95, 0.75, 0.20), (0.10, 0.35, 0.15), (0.60, 0.50, 0.10)),
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
    pairs = list(itertools.combinations(_COLORS.values(), 2))
    n_sty = len(_PATTERNS) * len(_PALETTES)
    # objects: adjective + noun, the synonym another adjective; people: first + surname; styles: one word
    words = iter(_words(3 * len(pairs) + 2 * len(pairs) + n_sty))
    objects, people, styles = [], [], []
    for pair in pairs:
        adj, adj2, noun = next(words), next(words), next(words)
        objects.append(Concept(f"{adj} {noun}", "object", (f"{adj2} {noun}",), render.TWO_TONE, pair))
    for k, pair in enumerate(pairs):
        first, last = next(words), next(words)
        name = f"{first.capitalize()} {last.capitalize()}"
        people.append(Concept(name, "person", (f"{_TITLES[k % len(_TITLES)]} {last.capitalize()}",), render.TWO_TONE,
                              pair))
    for pattern, palette in itertools.product(_PATTERNS, _PALETTES):
        stem = next(words)
        colors = palette if pattern == "wash" else palette[:2]
        styles.append(Concept(f"{stem} style", "style", (f"{stem} school",), pattern, colors))
    return objects, people, styles


def _order(objects, people, styles):
    """Types interleaved, and within a type the parts spread, so the first ten erased already mix colours and
    patterns."""
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
