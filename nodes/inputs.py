"""The inputs several MACE nodes share, in one place so their names, defaults and tooltips agree, and the reading of
the concepts they name (the box, then the optional file in ComfyUI's input folder)."""

import folder_paths
from comfy_api.latest import io

from ..mace_core import concept_files
from ..mace_core.concepts import DEFAULT_ANCHORS, FAMILIES


def concept_inputs() -> list:
    """The concept inputs every MACE node shares, in one place so their names and tooltips agree."""
    anchors = ", ".join(f"{f}: '{a}'" for f, a in DEFAULT_ANCHORS.items())
    return [
        io.String.Input("concepts", multiline=True, default="",
                        tooltip="Concepts to erase, one per line. Write 'concept => anchor' to choose what a line is "
                                "mapped onto, and 'concept | type' or 'concept => anchor | type' to give a line its "
                                f"own type ({', '.join(FAMILIES)}). Lines starting with # are ignored."),
        io.Combo.Input("concept_type", options=list(FAMILIES), default="celebrity",
                       tooltip="Which prompt templates describe the concepts (and the default anchor)."),
        io.String.Input("anchor", default="",
                        tooltip=f"What erased concepts turn into. Blank uses the type's default ({anchors})."),
    ]


def concept_file_input():
    """Added last to the nodes that take concepts, so saved workflows keep their widget order."""
    return io.String.Input("concept_file", default="", optional=True,
                           tooltip="Optional: a .txt or .csv file in ComfyUI's input folder whose concepts are added "
                                   "after the box's. .txt: one concept per line, as in the box. .csv: a header "
                                   "'concept,anchor,type' (anchor and type optional, blank cells = defaults), one "
                                   "concept per row. Blank = none.")


def preserve_inputs(near: str, what: str):
    """preserve, preservation_strength and lambda: the closed-form stages' (refine, fuse) shared inputs."""
    return [
        io.String.Input("preserve", multiline=True, default="",
                        tooltip="Concepts to keep intact, one per line (e.g. other celebrities or artists), "
                                "optionally typed: 'name | style'. Each is kept in the prompts of every type being "
                                "erased, and a typed one in its own type's too."),
        io.Float.Input("preservation_strength", default=1.0, min=0.0, max=100.0, step=0.05,
                       tooltip="How much generic prompts and the concepts to keep weigh against the erased "
                               "concepts' prompts (1 = equal total weight, 0 = no preservation)."),
        # The id stays 'lambda_' (a Python keyword otherwise; saved workflows and API graphs use it); the frontend
        # 1.27 labels widgets from locales/en/nodeDefs.json, not from display_name, so the label "lambda" is there.
        io.Float.Input("lambda_", display_name="lambda", default=0.01, min=0.0, max=10.0, step=0.001,
                       tooltip=f"Ridge term that keeps weights near {near}, relative to the mean eigenvalue of the "
                               f"concept statistics. Raise it for a gentler {what}."),
    ]


def read_concepts(concepts, concept_type, anchor, concept_file=""):
    """The box's concepts followed by those of concept_file, each with its own type and anchor."""
    return concept_files.load_concepts(concepts, concept_type, anchor, folder_paths.get_input_directory(),
                                       concept_file or "")


def concept_file_fingerprint(concept_file="", **_):
    """Rerun when the concept file's content changes, though its name did not."""
    return concept_files.fingerprint(folder_paths.get_input_directory(), concept_file or "")
