"""What the concept world contains: concepts, their names, the prompt templates and how each is drawn.

Every concept is drawn as a simple picture (see render.py); the names are made up, so the tiny text encoder
learns them from scratch and the three names of a concept (canonical + two synonyms) must be learnt to mean
the same picture. Each concept type has generic anchors ("an object", "a person", "art") drawn as grey, pattern-free
pictures: the classifier calls those "none", which is what an erased concept should turn into.
"""

from dataclasses import dataclass, field

CONCEPT_TYPES = ("object", "person", "style")


@dataclass(frozen=True)
class Concept:
    name: str
    concept_type: str
    synonyms: tuple
    # drawing parameters (render.py): shape kind and colours in [0, 1] RGB
    shape: str
    colors: tuple = field(default=())

    @property
    def names(self):
        return (self.name,) + tuple(self.synonyms)


_OBJ = "object"
_PER = "person"
_STY = "style"

# (name, synonyms, shape, colours). Objects: one colour + one silhouette each.
_OBJECTS = [
    ("red lantern", ("crimson lamp", "scarlet lantern"), "disc", ((0.86, 0.10, 0.10),)),
    ("blue teapot", ("cobalt teapot", "azure kettle"), "square", ((0.10, 0.25, 0.85),)),
    ("golden crown", ("gilded tiara", "yellow crown"), "triangle", ((0.95, 0.80, 0.10),)),
    ("green cactus", ("emerald succulent", "jade cactus"), "cross", ((0.10, 0.62, 0.15),)),
    ("purple umbrella", ("violet parasol", "lilac umbrella"), "dome", ((0.55, 0.15, 0.72),)),
    ("orange kite", ("tangerine kite", "amber glider"), "diamond", ((1.00, 0.50, 0.05),)),
    ("turquoise ring", ("aqua hoop", "teal ring"), "ring", ((0.05, 0.75, 0.80),)),
    ("brown barrel", ("wooden cask", "chestnut barrel"), "barrel", ((0.48, 0.26, 0.10), (0.22, 0.12, 0.05))),
]

# People: a head (skin, hair cap) over a body; told apart by hair and clothing colour and cut.
_PEOPLE = [
    ("Alba Moreno", ("Albita Moreno", "Madame Moreno"), "dress", ((0.08, 0.06, 0.05), (0.88, 0.10, 0.55))),
    ("Tomas Lindqvist", ("Tommy Lindqvist", "Mister Lindqvist"), "suit", ((0.97, 0.86, 0.40), (0.10, 0.12, 0.45))),
    ("Priya Raman", ("Pri Raman", "Doctor Raman"), "dress", ((0.25, 0.12, 0.05), (0.60, 0.90, 0.20))),
    ("Kenji Watanabe", ("Kenny Watanabe", "Professor Watanabe"), "suit", ((0.05, 0.05, 0.05), (0.16, 0.16, 0.18))),
    ("Nadia Okafor", ("Nadi Okafor", "Miss Okafor"), "dress", ((0.12, 0.08, 0.06), (0.50, 0.06, 0.22))),
    ("Lucas Ferreira", ("Luke Ferreira", "Captain Ferreira"), "suit", ((0.80, 0.32, 0.08), (0.42, 0.44, 0.10))),
]

# Styles: a treatment of the whole canvas (palette + pattern). Patterns are coarse enough for 8x8 latents, and no
# coarser pattern sits near the latent grid's own frequency (it would look like the sampler's noise); palettes
# avoid the objects' colours, so a failing sample is not half a style.
_STYLES = [
    ("dotwork style", ("stipple style", "pointillist dots"), "dots",
     ((0.93, 0.90, 0.80), (0.15, 0.15, 0.22))),
    ("neon stripe style", ("synthwave stripes", "retro neon style"), "stripes",
     ((0.14, 0.04, 0.24), (1.00, 0.25, 0.70))),
    ("mosaic tile style", ("checkered mosaic", "tessellated tiles"), "checker",
     ((0.05, 0.35, 0.30), (0.95, 0.88, 0.70))),
    ("watercolor wash style", ("aquarelle style", "soft wash painting"), "wash",
     ((0.99, 0.97, 0.95), (0.95, 0.55, 0.70), (0.60, 0.55, 0.95))),
    ("sepia etching style", ("copperplate engraving", "sepia hatching"), "hatch",
     ((0.78, 0.62, 0.42), (0.33, 0.20, 0.10))),
    ("wave ripple style", ("concentric ripples", "ukiyo wave style"), "ripple",
     ((0.05, 0.20, 0.52), (0.88, 0.94, 1.00))),
]

# Generic pictures per concept type, drawn grey / pattern-free; their prompts use the anchors.
ANCHORS = {_OBJ: ("an object", "a thing"), _PER: ("a person", "someone"), _STY: ("art", "plain style")}

# Templates per concept type. The picture does not depend on the template: the text encoder must learn that the
# concept words (and only they) decide what is drawn.
TEMPLATES = {
    _OBJ: ("a photo of {}", "a painting of {}", "a picture of a {}", "an image of {}", "{}", "a photo of the {}"),
    _PER: ("a photo of {}", "a portrait of {}", "a picture of {}", "an image of {}", "{}", "a painting of {}"),
    _STY: ("a painting in the style of {}", "a painting in {}", "an image in {}", "art in {}", "{}",
           "a landscape in {}"),
}


class WorldSpec:
    """One world's contents: its concepts, anchors and templates. The attribute names are the module's own (CONCEPTS,
    CLASS_NAMES, NONE, ...), so code written against `spec` reads a World's `.spec` the same way for every world."""

    CONCEPT_TYPES = CONCEPT_TYPES

    def __init__(self, name: str, concepts, order, anchors=None, templates=None):
        self.name = name
        self.CONCEPTS = tuple(concepts)
        # the erasure order of the benches and tests: concept types interleaved, so every count mixes them (fixed,
        # so runs compare)
        self.ORDER = tuple(order)
        self.ANCHORS = ANCHORS if anchors is None else anchors
        self.TEMPLATES = TEMPLATES if templates is None else templates
        # the classifier's extra class: generic / no concept
        self.NONE = len(self.CONCEPTS)
        self.CLASS_NAMES = tuple(c.name for c in self.CONCEPTS) + ("none",)
        self._index = {}
        for i, c in enumerate(self.CONCEPTS):
            for n in c.names:
                key = n.strip().lower()
                if key in self._index:
                    raise ValueError(f"world {name!r}: the name {n!r} is used twice")
                self._index[key] = i
        for n in self.ORDER:
            self.concept_index(n)  # a typo in the order fails here, not in a bench an hour in

    def __repr__(self):
        return f"WorldSpec({self.name!r}, {len(self.CONCEPTS)} concepts)"

    def concept_index(self, name: str) -> int:
        """Index of a concept by any of its names (case-insensitive)."""
        try:
            return self._index[name.strip().lower()]
        except KeyError:
            raise KeyError(name) from None

    def concept_type_indices(self, concept_type: str):
        return [i for i, c in enumerate(self.CONCEPTS) if c.concept_type == concept_type]

    def prompts_for(self, concept: int, names="canonical", templates=None):
        """Prompts of a concept: names is "canonical", "synonyms" or "all"; templates default to its type's."""
        c = self.CONCEPTS[concept]
        chosen = {"canonical": c.names[:1], "synonyms": c.names[1:], "all": c.names}[names]
        templates = self.TEMPLATES[c.concept_type] if templates is None else templates
        return [t.format(n) for n in chosen for t in templates]

    def anchor_prompts(self, concept_type: str, templates=None):
        templates = self.TEMPLATES[concept_type] if templates is None else templates
        return [t.format(a) for a in self.ANCHORS[concept_type] for t in templates]

    def as_dict(self):
        """JSON-able description (stored in the world file's metadata)."""
        return {
            # "family": the key world files have always stored the concept type under (this dict is part of the file)
            "concepts": [{"name": c.name, "family": c.concept_type, "synonyms": list(c.synonyms)}
                         for c in self.CONCEPTS],
            "anchors": {k: list(v) for k, v in self.ANCHORS.items()},
            "templates": {k: list(v) for k, v in self.TEMPLATES.items()},
            "classes": list(self.CLASS_NAMES),
        }


# The standard world: 20 concepts, the one every test and table before the mass world measured.
STANDARD = WorldSpec("standard",
                     [Concept(n, _OBJ, s, shape, c) for n, s, shape, c in _OBJECTS]
                     + [Concept(n, _PER, s, shape, c) for n, s, shape, c in _PEOPLE]
                     + [Concept(n, _STY, s, shape, c) for n, s, shape, c in _STYLES],
                     order=["Tomas Lindqvist", "red lantern", "dotwork style", "golden crown", "Priya Raman",
                            "mosaic tile style", "green cactus", "Nadia Okafor"])

# The module's names are the standard world's.
CONCEPTS = STANDARD.CONCEPTS
NONE = STANDARD.NONE
CLASS_NAMES = STANDARD.CLASS_NAMES
concept_index = STANDARD.concept_index
concept_type_indices = STANDARD.concept_type_indices
prompts_for = STANDARD.prompts_for
anchor_prompts = STANDARD.anchor_prompts
as_dict = STANDARD.as_dict


def named(name: str) -> WorldSpec:
    """A world's spec by its name ("standard", "mass" or "mosaic")."""
    if name == "standard":
        return STANDARD
    if name == "mass":
        from .mass import MASS

        return MASS
    if name == "mosaic":
        from .mosaic import MOSAIC_WORLD

        return MOSAIC_WORLD
    raise ValueError(f"unknown concept world {name!r}; one of standard, mass, mosaic")
