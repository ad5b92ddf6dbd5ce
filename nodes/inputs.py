"""The inputs several MACE nodes share, in one place so their names, defaults and tooltips agree: the concept boxes,
preserve and its weights, the concept_list and LoRA-bundle types they pass around, and the reading of the concepts
they name (the box, then the optional file in ComfyUI's input folder). A node's own inputs stay in its module."""

import logging

import folder_paths
from comfy_api.latest import io

from ..mace_core import concept_files
from ..mace_core.concepts import CONCEPT_TYPES, DEFAULT_ANCHORS, ConceptList, parse_preserve
from ..mace_core.errors import MaceInputError

log = logging.getLogger("MACE")

# The list MACE Concept List makes and every stage reads (mace_core.concepts.ConceptList), so it is typed once.
MaceConcepts = io.Custom("MACE_CONCEPTS")
# The LoRA bundle (mace_core.lora_bundle.LoRABundle) MACE Train and Load LoRAs make and Fuse and the savers read.
MaceLoras = io.Custom("MACE_LORAS")


def concept_inputs() -> list:
    """The concept inputs every MACE node shares, in one place so their names and tooltips agree."""
    anchors = ", ".join(f"{f}: '{a}'" for f, a in DEFAULT_ANCHORS.items())
    return [
        io.String.Input("concepts", multiline=True, default="",
                        tooltip="Concepts to erase, one per line. Write 'concept => anchor' to choose what a line is "
                                "mapped onto, and 'concept | type' or 'concept => anchor | type' to give a line its "
                                f"own type ({', '.join(CONCEPT_TYPES)}). Lines starting with # are ignored."),
        io.Combo.Input("concept_type", options=list(CONCEPT_TYPES), default="celebrity",
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
                        tooltip="Concepts to preserve, one per line (e.g. other celebrities or artists), "
                                "optionally typed: 'name | style'. Each is preserved in the prompts of every type "
                                "being erased, and a typed one in its own type's too."),
        io.Float.Input("preservation_strength", default=1.0, min=0.0, max=100.0, step=0.05,
                       tooltip="How much generic prompts and the concepts to preserve weigh against the erased "
                               "concepts' prompts (1 = equal total weight, 0 = no preservation). Past 10 "
                               "concepts the preserve list's share falls as in the paper's settings: a quarter at "
                               "100."),
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


def concept_list_input():
    """The last optional input of every node that reads concepts: saved workflows, which lack it, keep loading."""
    return MaceConcepts.Input("concept_list", optional=True,
                              tooltip="Optional: a MACE Concept List. When connected it supplies the concepts, their "
                                      "type and anchor, the concepts to preserve, your own prompts and nicknames and "
                                      "the caption corpus, so every stage reads one list; leave this node's own "
                                      "concept boxes blank (a box that says something else is an error; concept_type "
                                      "here is not used).")


def stage_list(concept_list, node: str, concepts=None, concept_type="celebrity", anchor=None, concept_file=None,
               preserve=None) -> ConceptList:
    """The list a stage works on: the connected concept_list, or one read from the node's own text inputs (None = the
    node has no such input). Precedence: a connected list wins, and a non-blank box of the node that says something
    else than the list is a MaceInputError naming that box (ConceptList.check_stage); the log says which was used."""
    if concept_list is None:
        items = read_concepts(concepts, concept_type, anchor or "", concept_file) if concepts is not None else []
        return ConceptList(tuple(items), tuple(parse_preserve(preserve)), concept_type=concept_type,
                           anchor=anchor or "")
    if not isinstance(getattr(concept_list, "concepts", None), tuple):
        raise MaceInputError("concept_list", "is not a MACE concept list.", "Connect the output of MACE Concept List.")
    concept_list.check_stage(node, concepts=concepts, anchor=anchor, concept_file=concept_file, preserve=preserve)
    if concept_list.source:  # a list from the Concept List node (MACE Erase passes its own typed one on too)
        log.info("MACE %s: %d concepts and %d to preserve from the connected concept_list (type %s%s)", node,
                 len(concept_list.concepts), len(concept_list.preserve), concept_list.concept_type,
                 f", corpus '{concept_list.corpus_name}'" if concept_list.corpus_name else "")
    return concept_list


def corpus_fingerprint(corpus_file="", **_):
    return concept_files.fingerprint(folder_paths.get_input_directory(), corpus_file or "", concept_files.CORPUS_EXT)


def latent_samples(latents, model, input_name: str = "latents"):
    """The (batch, channels, H, W) samples of a connected LATENT, checked against the model's latent channels (Train
    and Attention Map take given pictures; each then checks how many it needs)."""
    samples = latents.get("samples") if isinstance(latents, dict) else None
    if samples is None or samples.ndim != 4:
        raise MaceInputError(input_name, "expected an image LATENT (batch, channels, height, width).")
    channels = model.model.latent_format.latent_channels
    if samples.shape[1] != channels:
        raise MaceInputError(input_name, f"have {samples.shape[1]} channels; this model's latents have {channels}.",
                             "Encode the images with this model's VAE.")
    return samples
