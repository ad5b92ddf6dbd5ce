"""Concept lists as users type them, the families they belong to, default anchors and prompt templates.

A concept list is one concept per line, optionally `concept => anchor` to pick the word the concept is mapped onto.
Templates are written for this project; each family has about thirty, so the edit sees the concept in many contexts.
"""

from dataclasses import dataclass

FAMILIES = ("object", "celebrity", "style", "explicit")

DEFAULT_ANCHORS = {
    "object": "an object",
    "celebrity": "a person",
    "style": "art",
    "explicit": "a person wearing clothes",
}

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


@dataclass(frozen=True)
class Concept:
    name: str
    anchor: str
    family: str

    def prompts(self, anchor: bool = False) -> list[str]:
        word = self.anchor if anchor else self.name
        return [t.format(word) for t in TEMPLATES[self.family]]


def check_family(family: str, input_name: str = "concept_type") -> str:
    from .errors import MaceInputError

    if family not in FAMILIES:
        raise MaceInputError(input_name, f"unknown concept type '{family}'.", f"Use one of: {', '.join(FAMILIES)}.")
    return family


def _check_name(text: str, input_name: str, line_no: int):
    from .errors import MaceInputError

    for s in _SYNTAX:
        if s in text:
            raise MaceInputError(
                input_name,
                f"line {line_no} ('{text}') contains '{s}', which ComfyUI reads as prompt syntax.",
                "Write the name without brackets, colons or backslashes.",
            )


def parse_concepts(text: str, family: str, anchor: str = "", input_name: str = "concepts") -> list[Concept]:
    """One concept per line, `concept => anchor` overrides the anchor; blank lines are ignored."""
    from .errors import MaceInputError

    check_family(family)
    default_anchor = anchor.strip() or DEFAULT_ANCHORS[family]
    _check_name(default_anchor, "anchor", 1)
    out: list[Concept] = []
    seen: dict[str, int] = {}
    for line_no, raw in enumerate((text or "").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, own_anchor = line.partition("=>")
        name, own_anchor = " ".join(name.split()), " ".join(own_anchor.split())
        if not name:
            raise MaceInputError(input_name, f"line {line_no} has an anchor but no concept before '=>'.")
        _check_name(name, input_name, line_no)
        _check_name(own_anchor, input_name, line_no)
        a = own_anchor or default_anchor
        if name.lower() == a.lower():
            raise MaceInputError(input_name, f"concept '{name}' (line {line_no}) is the same as its anchor.",
                                 "Pick an anchor that differs from the concept, e.g. a more general word.")
        key = name.lower()
        if key in seen:
            raise MaceInputError(input_name, f"concept '{name}' is listed twice (lines {seen[key]} and {line_no}).",
                                 "Remove the duplicate.")
        seen[key] = line_no
        out.append(Concept(name, a, family))
    if not out:
        raise MaceInputError(input_name, "no concepts given.", "Write one concept per line, e.g. 'Claude Monet'.")
    return out


def parse_names(text: str, input_name: str = "preserve") -> list[str]:
    """A plain list of names (concepts to keep); may be empty."""
    names = []
    for line_no, raw in enumerate((text or "").splitlines(), 1):
        line = " ".join(raw.split())
        if line and not line.startswith("#"):
            _check_name(line, input_name, line_no)
            names.append(line)
    return names
