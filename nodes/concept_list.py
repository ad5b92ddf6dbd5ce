"""MACE Concept List: the concepts, their type and anchor, the concepts to preserve, your own prompts and nicknames
and a caption corpus, typed once and read by every stage (issue 16: one concept list through the whole graph)."""

import logging

import folder_paths
from comfy_api.latest import io

from ..mace_core import concept_files
from ..mace_core.concepts import ConceptList, parse_preserve, parse_prompts
from .inputs import (
    MaceConcepts,
    concept_file_fingerprint,
    concept_file_input,
    concept_inputs,
    corpus_fingerprint,
    read_concepts,
)

log = logging.getLogger("MACE")

PRESERVE_TIP = ("Concepts to preserve, one per line (e.g. other celebrities or artists), optionally typed: "
                "'name | style'. Refine and Fuse preserve them, Erasure Check draws a row for each.")
PROMPTS_TIP = ("Optional: your own prompts and nicknames, one concept per line: 'concept: item; item'. An item that "
               "contains the concept's name (or '{}' for it) is a prompt, used beside the type's templates in "
               "refinement, training and fusion, e.g. 'Claude Monet: water lilies at dawn by Claude Monet'. Any other "
               "item is a nickname, erased with the concept onto its anchor, e.g. 'Claude Monet: the painter of "
               "Giverny'. Lines starting with # are ignored.")
CORPUS_TIP = ("Optional: a .txt file in ComfyUI's input folder with captions of what the model should keep drawing, "
              "one per line (thousands are fine). They join the built-in generic prompts in the preservation prior of "
              "Refine and Fuse; the prior is computed once and cached until the file changes. Blank = the built-in "
              "prompts only.")


class MACEConceptList(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MACEConceptList",
            display_name="MACE Concept List",
            category="MACE",
            description="The concepts to erase, their type and anchor, the concepts to preserve, your own prompts and "
                        "nicknames and an optional caption corpus, in one place. Connect its output to the "
                        "concept_list input of Refine, Train, Fuse, Save Erasure, Load LoRAs, Erase, Erasure Check "
                        "and Attention Map, so every stage reads the same list instead of a copy typed into each.",
            inputs=[
                *concept_inputs(),
                io.String.Input("preserve", multiline=True, default="", tooltip=PRESERVE_TIP),
                io.String.Input("prompts", multiline=True, default="", tooltip=PROMPTS_TIP),
                concept_file_input(),
                io.String.Input("corpus_file", default="", optional=True, tooltip=CORPUS_TIP),
            ],
            outputs=[MaceConcepts.Output("concept_list", display_name="concept_list",
                                         tooltip="The list, for every MACE stage's concept_list input.")],
        )

    @classmethod
    def fingerprint_inputs(cls, concept_file="", corpus_file="", **kwargs):
        # a file edited under the same name must make the list (and every stage after it) run again
        return concept_file_fingerprint(concept_file) + "|" + corpus_fingerprint(corpus_file)

    @classmethod
    def execute(cls, concepts, concept_type, anchor, preserve, prompts, concept_file="", corpus_file=""):
        return io.NodeOutput(make_list(concepts, concept_type, anchor, preserve, prompts, concept_file or "",
                                       corpus_file or ""))


def make_list(concepts="", concept_type="celebrity", anchor="", preserve="", prompts="", concept_file="",
              corpus_file="") -> ConceptList:
    """Every part read and checked now, so a mistake is reported by this node, naming its input, before any stage
    runs."""
    items = parse_prompts(prompts, read_concepts(concepts, concept_type, anchor, concept_file))
    preserved = parse_preserve(preserve)
    corpus = ()
    if (corpus_file or "").strip():
        corpus = tuple(concept_files.read_corpus(folder_paths.get_input_directory(), corpus_file))
    source = (("concepts", concepts or ""), ("anchor", anchor or ""), ("preserve", preserve or ""),
              ("concept_file", concept_file or ""))
    out = ConceptList(tuple(items), tuple(preserved), corpus, corpus_file.strip() if corpus else "", concept_type,
                      anchor or "", source)
    own = sum(len(c.extra) for c in items)
    nick = sum(len(c.aliases) for c in items)
    log.info("MACE concept list: %d concepts (%d own prompts, %d nicknames), %d to preserve, %s", len(items), own, nick,
             len(preserved), f"{len(corpus)} captions from '{out.corpus_name}'" if corpus else "no corpus")
    return out


NODES = [MACEConceptList]
