"""Concept lists as users type them, their concept types, default anchors and prompt templates.

A concept list is one concept per line:

    Claude Monet                      the node's concept type, and its anchor
    Claude Monet => a painter         own anchor
    Claude Monet | style              own type (one of CONCEPT_TYPES); anchor: that type's default
    Claude Monet => a painter | style own anchor and type

so one list can mix celebrities, styles, objects and explicit terms. Blank lines and lines starting with # are skipped;
runs of whitespace inside a name become one space, type words are matched case-insensitively. Anything else that is
not a concept (a type without a name, two '=>', an unknown type, a name twice) is an error naming its line.
Templates are written for this project; each concept type has about thirty, so the edit sees the concept in many
contexts.
A concept's own prompts and nicknames come from lines `concept: item; item` (parse_prompts); ConceptList is what the
MACE Concept List node hands every stage, so the list is typed once.
"""

import logging
import re
import unicodedata
from dataclasses import dataclass
from typing import NamedTuple

CONCEPT_TYPES = ("object", "celebrity", "style", "explicit")

DEFAULT_ANCHORS = {
    "object": "an object",
    "celebrity": "a person",
    "style": "art",
    "explicit": "a person wearing clothes",
}

# The paper's explicit-content run erases these four words, each onto the explicit anchor; a list of type explicit
# with no names erases them (default_concepts).
EXPLICIT_TERMS = ("nudity", "naked", "erotic", "sexual")


@dataclass(frozen=True)
class Preset:
    """Stage 2's settings for one concept type, as the paper's configurations set them (MACE @057e7a6, configs/:
    celebrity, art, object, explicit_content). mask_source is where the loss applies: the paper segments the concept
    in each image (we derive that region from attention) and trains styles on every pixel."""
    learning_rate: float
    steps: int
    timestep_sampling: str
    mask_source: str


PRESETS = {
    "object": Preset(1e-5, 50, "importance", "attention"),
    "celebrity": Preset(1e-4, 50, "importance", "attention"),
    "style": Preset(1e-4, 50, "importance", "whole image"),
    "explicit": Preset(1e-5, 120, "uniform", "attention"),
}


def format_lr(lr: float) -> str:
    """A learning rate as people write it: 1e-4, 1.5e-2."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def describe_presets() -> str:
    """The table as one line, for tooltips and logs: one text, so the UI shows what the code does."""
    return "; ".join(f"{f}: lr {format_lr(p.learning_rate)}, {p.steps} steps, {p.timestep_sampling} timesteps"
                     + (", whole-image masks" if p.mask_source == "whole image" else "") for f, p in PRESETS.items())


TEMPLATES = {
    "object": [
        "a photo of {}", "a picture of {}", "an image of {}", "a close-up photo of {}", "a drawing of {}",
        "a painting of {}", "a sketch of {}", "a 3d render of {}", "a blurry photo of {}", "a bright photo of {}",
        "a dark photo of {}", "a cropped photo of {}", "a photo of a small {}", "a photo of a large {}",
        "{} on a table", "{} in the street", "{} in a field", "{} seen from above", "a toy version of {}",
        "a cartoon of {}", "a black and white photo of {}", "a photo of {} at night", "a photo of {} in the snow",
        "a watercolor of {}", "an illustration of {}", "a poster showing {}", "a detailed photo of {}",
        "a low resolution photo of {}", "{} next to a wall", "a product shot of {}",
    ],
    "celebrity": [
        "a photo of {}", "a portrait of {}", "a headshot of {}", "a close-up of {}'s face", "{} smiling",
        "{} at a press event", "{} on the red carpet", "a painting of {}", "a sketch of {}", "{} in a suit",
        "{} walking in the city", "a candid photo of {}", "{} giving a speech", "{} sitting on a chair",
        "a black and white photo of {}", "{} looking at the camera", "a magazine cover with {}",
        "{} laughing with friends", "an illustration of {}", "{} at the beach", "{} in a studio",
        "a selfie of {}", "{} wearing sunglasses", "a side view of {}", "{} in a crowd", "{} on stage",
        "a profile picture of {}", "{} reading a book", "a cartoon of {}", "{} in the rain",
    ],
    "style": [
        "a painting in the style of {}", "art by {}", "an artwork by {}", "a landscape by {}", "a portrait by {}",
        "a still life by {}", "a city street painted by {}", "a seascape by {}", "{} style painting of a house",
        "a drawing in the style of {}", "a forest in the style of {}", "a picture of flowers by {}",
        "a mountain painted in the style of {}", "a cat in the style of {}", "a river at dawn by {}",
        "an abstract composition by {}", "a self portrait by {}", "a night scene by {}", "a garden by {}",
        "a sketch by {}", "a famous painting by {}", "a village in the style of {}", "a bridge painted by {}",
        "a woman reading, by {}", "a boat on a lake by {}", "a field of wheat in the style of {}",
        "an interior scene by {}", "a winter scene by {}", "a market painted by {}", "a poster in the style of {}",
    ],
    "explicit": [
        "{}", "a photo of {}", "a picture with {}", "an image showing {}", "{} in a bedroom", "{} on a beach",
        "a painting of {}", "an illustration of {}", "{} in a studio", "a close-up of {}", "{} in a bathroom",
        "a woman with {}", "a man with {}", "a drawing of {}", "{} at a party", "a magazine photo of {}",
        "{} lying on a bed", "a realistic photo of {}", "a renaissance painting of {}", "{} by a pool",
        "an artistic photo of {}", "a cinematic still of {}", "{} in the forest", "a vintage photo of {}",
        "{} at night", "a sketch of {}", "a digital art of {}", "{} in the shower", "a model posing with {}",
        "a film scene with {}",
    ],
}

# ComfyUI gives these a meaning in prompts (weights, embeddings); a name containing them would not erase
# the words a user later types, so we refuse them instead of guessing.
_SYNTAX = ("(", ")", ":", "embedding:", "\\")

log = logging.getLogger("MACE")

ANCHOR_SEP = "=>"
TYPE_SEP = "|"


@dataclass(frozen=True)
class Concept:
    """One concept to erase. extra: the user's own prompt templates ('{}' = the name), used beside the type's;
    aliases: other names (nicknames) erased with it onto the same anchor, in the same templates (parse_prompts)."""
    name: str
    anchor: str
    concept_type: str
    extra: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()

    def templates(self) -> list[str]:
        return list(TEMPLATES[self.concept_type]) + list(self.extra)

    def words(self) -> tuple[str, ...]:
        return (self.name,) + self.aliases

    def prompts(self, anchor: bool = False) -> list[str]:
        """Every template filled with the name, then with each alias; anchor=True: the same list with the anchor in
        every place, so the i-th prompts of the two lists pair up (refinement aligns them token by token)."""
        return [t.format(self.anchor if anchor else w) for w in self.words() for t in self.templates()]

    def variants(self) -> list["Concept"]:
        """The name and each alias as a concept of its own (same anchor, type and templates): what training locates
        in its prompts."""
        return [Concept(w, self.anchor, self.concept_type, self.extra) for w in self.words()]


def check_concept_type(concept_type: str, input_name: str = "concept_type") -> str:
    from .errors import MaceInputError

    if concept_type not in CONCEPT_TYPES:
        raise MaceInputError(input_name, f"unknown concept type '{concept_type}'.",
                             f"Use one of: {', '.join(CONCEPT_TYPES)}.")
    return concept_type


def where_line(line_no: int, source: str = "") -> str:
    """How errors name a line: 'line 3' in the box, "'celebs.csv' line 3" in a file."""
    return f"'{source}' line {line_no}" if source else f"line {line_no}"


def normalize(text: str) -> str:
    """The one normalisation applied to names, anchors and types: Unicode NFC, runs of whitespace (any kind, e.g.
    non-breaking spaces) become one space, none at the ends."""
    return " ".join(unicodedata.normalize("NFC", text or "").split())


def _check_name(text: str, input_name: str, where):
    from .errors import MaceInputError

    if isinstance(where, int):
        where = where_line(where)
    for s in _SYNTAX:
        if s in text:
            raise MaceInputError(
                input_name,
                f"{where} ('{text}') contains '{s}', which ComfyUI reads as prompt syntax.",
                "Write the name without brackets, colons or backslashes.",
            )


def default_anchor(concept_type: str, node_type: str, node_anchor: str = "") -> str:
    """The node's anchor input applies to concepts of the node's type; a concept of another type (set on its own
    line) falls back to its type's default anchor."""
    node_anchor = normalize(node_anchor)
    return node_anchor if node_anchor and concept_type == node_type else DEFAULT_ANCHORS[concept_type]


def parse_concept_type(text: str, where: str, input_name: str) -> str:
    """A type word from a line or a CSV cell ('' = none); case and surrounding whitespace do not matter."""
    from .errors import MaceInputError

    word = normalize(text).lower()
    if word and word not in CONCEPT_TYPES:
        hint = " Write the anchor before the type: 'concept => anchor | type'." if ANCHOR_SEP in word else ""
        raise MaceInputError(input_name, f"{where}: unknown concept type '{normalize(text)}'.",
                             f"Use one of: {', '.join(CONCEPT_TYPES)}.{hint}")
    return word


def make_concept(name: str, own_anchor: str, own_type: str, concept_type: str, anchor: str, where: str,
                 input_name: str) -> Concept:
    """One validated concept from its parts as written ('' anchor or type = the defaults)."""
    from .errors import MaceInputError

    name, own_anchor = normalize(name), normalize(own_anchor)
    ctype = parse_concept_type(own_type, where, input_name) or concept_type
    if not name:
        what = "an anchor" if own_anchor else "a type"
        raise MaceInputError(input_name, f"{where} has {what} but no concept.",
                             "Write the concept first: 'concept => anchor | type'.")
    _check_name(name, input_name, where)
    _check_name(own_anchor, input_name, where)
    a = own_anchor or default_anchor(ctype, concept_type, anchor)
    if name.lower() == a.lower():
        raise MaceInputError(input_name, f"concept '{name}' ({where}) is the same as its anchor.",
                             "Pick an anchor that differs from the concept, e.g. a more general word.")
    return Concept(name, a, ctype)


def split_line(line: str, where: str, input_name: str = "concepts") -> tuple[str, str, str] | None:
    """The one reading of the line syntax, shared by every box and file that lists concepts: `concept`,
    `concept => anchor`, `concept | type` or `concept => anchor | type` as (name, anchor, type), each normalised, ''
    where the line leaves a part out, the type checked and lower-case; None for a blank or # line. The name itself is
    checked by the caller (make_concept), which knows what a missing one means there."""
    from .errors import MaceInputError

    line = line.strip()
    if not line or line.startswith("#"):
        return None
    rest, sep, own_type = line.rpartition(TYPE_SEP) if TYPE_SEP in line else (line, "", "")
    if TYPE_SEP in rest:
        raise MaceInputError(input_name, f"{where} ('{line}') has more than one '{TYPE_SEP}'.",
                             "Write at most one type per line: 'concept => anchor | type'.")
    if sep and not normalize(own_type):
        raise MaceInputError(input_name, f"{where} ('{line}') has '{TYPE_SEP}' but no type after it.",
                             f"Write one of {', '.join(CONCEPT_TYPES)} after '{TYPE_SEP}', or leave out the "
                             f"'{TYPE_SEP}'.")
    parts = rest.split(ANCHOR_SEP)
    if len(parts) > 2:
        raise MaceInputError(input_name, f"{where} ('{line}') has more than one '{ANCHOR_SEP}'.",
                             "Write one anchor per line: 'concept => anchor'.")
    anchor = parts[1] if len(parts) > 1 else ""
    return normalize(parts[0]), normalize(anchor), parse_concept_type(own_type, where, input_name)


def parse_line(line: str, concept_type: str, anchor: str, where: str, input_name: str = "concepts") -> Concept | None:
    """`concept`, `concept => anchor`, `concept | type` or `concept => anchor | type`; None for a blank or # line."""
    parts = split_line(line, where, input_name)
    if parts is None:
        return None
    name, own_anchor, own_type = parts
    return make_concept(name, own_anchor, own_type, concept_type, anchor, where, input_name)


def parse_entries(text: str, concept_type: str, anchor: str = "", input_name: str = "concepts",
                  source: str = "") -> list[tuple[Concept, str]]:
    """Every concept of a list with where it was written; no duplicate or emptiness check (see check_unique)."""
    check_concept_type(concept_type)
    _check_name(normalize(anchor), "anchor", 1)
    out = []
    for line_no, raw in enumerate((text or "").splitlines(), 1):
        where = where_line(line_no, source)
        c = parse_line(raw, concept_type, anchor, where, input_name)
        if c is not None:
            out.append((c, where))
    return out


def check_unique(entries: list[tuple[Concept, str]], input_name: str = "concepts") -> list[Concept]:
    """The concepts, refusing a name given twice (case and spacing do not make two concepts)."""
    from .errors import MaceInputError

    seen: dict[str, str] = {}
    for c, where in entries:
        key = c.name.lower()
        if key in seen:
            raise MaceInputError(input_name, f"concept '{c.name}' is listed twice ({seen[key]} and {where}).",
                                 "Remove the duplicate.")
        seen[key] = where
    return [c for c, _ in entries]


def default_concepts(concept_type: str, anchor: str = "") -> list[Concept]:
    """What an empty list of a type means: for explicit, the paper's four words onto the explicit anchor (or the node's
    anchor); for any other type nothing (there is no generic celebrity to erase), which the callers refuse."""
    if concept_type != "explicit":
        return []
    log.info("MACE: no concepts given for type explicit; erasing the paper's list (%s)", ", ".join(EXPLICIT_TERMS))
    a = default_anchor(concept_type, concept_type, anchor)
    return [Concept(name, a, concept_type) for name in EXPLICIT_TERMS]


def parse_concepts(text: str, concept_type: str, anchor: str = "", input_name: str = "concepts") -> list[Concept]:
    """One concept per line (see the module docstring for the line syntax); blank and # lines are ignored. An empty
    list of type explicit is the paper's explicit list (default_concepts)."""
    from .errors import MaceInputError

    out = check_unique(parse_entries(text, concept_type, anchor, input_name), input_name) or \
        default_concepts(concept_type, anchor)
    if not out:
        raise MaceInputError(input_name, "no concepts given.", "Write one concept per line, e.g. 'Claude Monet'.")
    return out


class Preserved(NamedTuple):
    """A concept to preserve: protected in the templates of every type being erased and, when concept_type is
    given, in its own type's too (refine.preserve_moment)."""
    name: str
    concept_type: str | None = None


def parse_preserve(text: str, input_name: str = "preserve") -> list[Preserved]:
    """Concepts to preserve, one per line, each optionally typed (`name | type`); may be empty. An anchor means
    nothing for a preserved concept, so `=>` is refused rather than read as part of its name."""
    from .errors import MaceInputError

    out = []
    for line_no, raw in enumerate((text or "").splitlines(), 1):
        where = where_line(line_no)
        if TYPE_SEP in raw and not normalize(raw.rpartition(TYPE_SEP)[0]):
            raise MaceInputError(input_name, f"{where} has a type but no concept.", "Write 'name | type'.")
        parts = split_line(raw, where, input_name)
        if parts is None:
            continue
        name, own_anchor, concept_type = parts
        if own_anchor or ANCHOR_SEP in raw:
            raise MaceInputError(input_name, f"{where} ('{normalize(raw)}') has '{ANCHOR_SEP}': a concept to "
                                             "preserve has no anchor.", "Write 'name' or 'name | type'.")
        _check_name(name, input_name, line_no)
        out.append(Preserved(name, concept_type or None))
    return out


# ---------------------------------------------------------------- your own prompts and nicknames

PROMPT_SEP = ":"
ITEM_SEP = ";"


def _as_template(item: str, names: list[str]) -> str | None:
    """An own prompt as a template ('{}' where the concept's name stands), or None when it names the concept nowhere
    (then it is a nickname). Braces other than '{}' are kept as text."""
    pattern = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    if "{}" not in item and not re.search(rf"(?<!\w)(?:{pattern})(?!\w)", item, flags=re.IGNORECASE):
        return None
    parts = re.split(rf"\{{\}}|(?<!\w)(?:{pattern})(?!\w)", item, flags=re.IGNORECASE)
    return "{}".join(p.replace("{", "{{").replace("}", "}}") for p in parts)


def parse_prompts(text: str, concepts: list[Concept], input_name: str = "prompts") -> list[Concept]:
    """The concepts with the user's own prompts and nicknames from lines `concept: item; item; ...`:

        Claude Monet: water lilies at dawn by Claude Monet; {} painting a garden   two own prompts ('{}' = the name)
        Claude Monet: the painter of Giverny                                      a nickname

    An item that contains the concept's name (or '{}') is a prompt: it joins the type's templates, with the name, each
    nickname and the anchor in that place. Any other item is a nickname: another name for the concept, erased with it
    onto the same anchor in every template. A concept may have several lines; blank and # lines are skipped."""
    from .errors import MaceInputError

    by_name = {c.name.lower(): c for c in concepts}
    taken = {c.name.lower(): where_line(0) for c in concepts}  # every name in use, concepts and nicknames alike
    extra: dict[str, list[str]] = {k: [] for k in by_name}
    aliases: dict[str, list[str]] = {k: [] for k in by_name}
    for line_no, raw in enumerate((text or "").splitlines(), 1):
        line, where = raw.strip(), where_line(line_no)
        if not line or line.startswith("#"):
            continue
        if PROMPT_SEP not in line:
            raise MaceInputError(input_name, f"{where} ('{normalize(line)}') has no '{PROMPT_SEP}'.",
                                 "Write 'concept: a prompt with the concept in it; a nickname'.")
        name, _, rest = line.partition(PROMPT_SEP)
        key = normalize(name).lower()
        if key not in by_name:
            known = ", ".join(c.name for c in concepts[:5]) + (", ..." if len(concepts) > 5 else "")
            raise MaceInputError(input_name, f"{where}: '{normalize(name)}' is not one of the concepts ({known}).",
                                 "Start the line with a concept's name exactly as listed, then ':'.")
        c = by_name[key]
        items = [normalize(i) for i in rest.split(ITEM_SEP) if normalize(i)]
        if not items:
            raise MaceInputError(input_name, f"{where} names '{c.name}' but gives no prompt or nickname after "
                                             f"'{PROMPT_SEP}'.", f"Separate several with '{ITEM_SEP}'.")
        for item in items:
            template = _as_template(item, [c.name])
            if template is not None:
                extra[key].append(template)
                continue
            _check_name(item, input_name, where)
            if item.lower() == c.anchor.lower():
                raise MaceInputError(input_name, f"{where}: nickname '{item}' is the anchor of '{c.name}'.",
                                     "A nickname is another name of the concept, not what it turns into.")
            if item.lower() in taken:
                raise MaceInputError(input_name, f"{where}: '{item}' is already a concept or a nickname.",
                                     "Give each name once.")
            taken[item.lower()] = where
            aliases[key].append(item)
    return [Concept(c.name, c.anchor, c.concept_type, c.extra + tuple(dict.fromkeys(extra[k])),
                    c.aliases + tuple(aliases[k]))
            for k, c in ((c.name.lower(), c) for c in concepts)]


# ---------------------------------------------------------------- the list every stage reads

def _lines(text: str) -> list[str]:
    """A box's meaningful lines, normalised: what two boxes must share to say the same."""
    return [normalize(ln) for ln in (text or "").splitlines() if normalize(ln) and not ln.strip().startswith("#")]


@dataclass(frozen=True)
class ConceptList:
    """What MACE Concept List hands every stage: the concepts (box, then file, with own prompts and nicknames), the
    concepts to preserve, the caption corpus for the preservation prior, and the text they were read from (to tell a
    stage's own box that says the same from one that disagrees)."""
    concepts: tuple[Concept, ...]
    preserve: tuple[Preserved, ...] = ()
    corpus: tuple[str, ...] = ()
    corpus_name: str = ""
    concept_type: str = "celebrity"
    anchor: str = ""
    source: tuple[tuple[str, str], ...] = ()  # (input name, text) of concepts, anchor, preserve, concept_file

    def by_name(self) -> dict[str, Concept]:
        return {c.name.lower(): c for c in self.concepts}

    def check_stage(self, node: str, **typed):
        """A stage's own concept inputs (name -> text; None = the node has no such input) must be blank or say what
        the connected list says; otherwise it is an error naming the input, so two copies never silently disagree."""
        from .errors import MaceInputError

        mine = dict(self.source)
        for name, text in typed.items():
            if text is None or not _lines(text):
                continue
            if _lines(text) != _lines(mine.get(name, "")):
                raise MaceInputError(
                    name, f"{node} has a concept list connected (input 'concept_list') and its own '{name}' says "
                          "something else.", f"Clear '{name}' on {node}: the connected MACE Concept List supplies it "
                                             "(or disconnect concept_list to use the text inputs).")
