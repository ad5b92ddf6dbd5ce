"""Every node that reads concept lines reads them with mace_core.concepts.split_line, so one line means one concept
everywhere (issue 16: Save Erasure recorded 'Claude Monet | style' as a concept name)."""

import json

import pytest
from safetensors import safe_open


@pytest.fixture(scope="module")
def refined(pack, tiny):
    model, clip = tiny
    return pack["MACERefineCrossAttention"].execute(model, clip, "Claude Monet | style", "celebrity", "", "", 0.0,
                                                    0.01).result[0]


def test_save_erasure_records_typed_concepts_by_name(pack, refined, loras_dir):
    pack["MACESaveErasure"].execute(refined, "typed", "full", 64, None,
                                    "Claude Monet | style\n# a note\nPablo  Picasso => a painter | Style\nAnn => art")
    with safe_open(str(loras_dir / "typed.safetensors"), "pt") as f:
        recorded = json.loads(f.metadata()["mace_concepts"])
    assert recorded == [
        {"concept": "Claude Monet", "anchor": "", "family": "style"},
        {"concept": "Pablo Picasso", "anchor": "a painter", "family": "style"},
        {"concept": "Ann", "anchor": "art", "family": ""},
    ]


@pytest.mark.parametrize("line,fragment", [
    ("Claude Monet | painter", "unknown concept type 'painter'"),
    ("a => b => c", "more than one '=>'"),
    ("=> art | style", "no concept"),
])
def test_save_erasure_refuses_lines_the_other_nodes_refuse(pack, mods, refined, loras_dir, line, fragment):
    with pytest.raises(mods.errors.MaceInputError) as e:
        pack["MACESaveErasure"].execute(refined, "bad", "full", 64, None, line)
    assert e.value.input_name == "concepts" and fragment in str(e.value)
    assert not (loras_dir / "bad.safetensors").exists(), "nothing is written for a bad line"
