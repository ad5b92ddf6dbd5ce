import pytest

from mace_core.align import align_pairs, concept_positions
from mace_core.concepts import DEFAULT_ANCHORS, TEMPLATES, Preserved, parse_concepts, parse_preserve
from mace_core.errors import MaceInputError

END = 99


def test_parse_lines_anchors_and_defaults():
    cs = parse_concepts("Claude Monet\n\n  Pablo   Picasso => a painter \n# comment", "style")
    assert [c.name for c in cs] == ["Claude Monet", "Pablo Picasso"]
    assert cs[0].anchor == DEFAULT_ANCHORS["style"] and cs[1].anchor == "a painter"
    assert len(cs[0].prompts()) >= 28 and "Claude Monet" in cs[0].prompts()[0]
    assert all(len(ts) >= 28 for ts in TEMPLATES.values())


@pytest.mark.parametrize("text,fragment", [
    ("", "no concepts"),
    ("   \n \n", "no concepts"),
    ("a person", "same as its anchor"),
    ("Tom => Tom", "same as its anchor"),
    ("(Tom:1.2)", "prompt syntax"),
    ("embedding:foo", "prompt syntax"),
    ("Tom\ntom", "listed twice"),
    ("=> a man", "no concept"),
])
def test_bad_concepts_name_the_input(text, fragment):
    with pytest.raises(MaceInputError, match=fragment) as e:
        parse_concepts(text, "celebrity")
    assert "'concepts'" in str(e.value)


def test_unknown_concept_type_and_preserve_syntax():
    with pytest.raises(MaceInputError, match="concept_type"):
        parse_concepts("Tom", "animal")
    with pytest.raises(MaceInputError, match="'preserve'"):
        parse_preserve("Ann\n(Bob)")
    assert parse_preserve("Ann\n\n Bob  Lee ") == [Preserved("Ann"), Preserved("Bob Lee")]
    assert parse_preserve("Claude Monet | Style\nAnn") == [Preserved("Claude Monet", "style"), Preserved("Ann", None)]
    for bad in ("Ann | painter", " | style"):
        with pytest.raises(MaceInputError) as e:
            parse_preserve(bad)
        assert e.value.input_name == "preserve"


def test_alignment_skips_the_differing_middle_and_pairs_padding():
    old = [0, 5, 6, 7, 8, 9, END, END, END, END]  # start, "a photo of" (5,6), concept (7,8), suffix 9, end, pad
    new = [0, 5, 6, 3, 9, END, END, END, END, END]  # anchor is one token (3)
    i_old, i_new = align_pairs(old, new, END)
    pairs = list(zip(i_old.tolist(), i_new.tolist()))
    assert (0, 0) in pairs and (1, 1) in pairs and (2, 2) in pairs
    assert (5, 4) in pairs  # common suffix
    assert (6, 5) in pairs and (9, 8) in pairs  # end and padding, position by position
    assert all(o not in (3, 4) for o, _ in pairs)  # concept tokens left out
    assert concept_positions(old, new, END) == [3, 4]


def test_split_line_is_the_one_reading_of_the_syntax():
    from mace_core.concepts import split_line

    assert split_line("  Claude   Monet | Style ", "line 1") == ("Claude Monet", "", "style")
    assert split_line("Claude Monet => a painter | style", "line 1") == ("Claude Monet", "a painter", "style")
    assert split_line("Claude Monet => a painter", "line 1") == ("Claude Monet", "a painter", "")
    assert split_line("# Claude Monet | style", "line 1") is None and split_line("   ", "line 1") is None
    for bad, fragment in (("a | style | object", "more than one '|'"), ("a => b => c", "more than one '=>'"),
                          ("a |", "no type after it"), ("a | painter", "unknown concept type")):
        with pytest.raises(MaceInputError, match=fragment):
            split_line(bad, "line 1")


def test_preserved_concepts_refuse_an_anchor():
    with pytest.raises(MaceInputError, match="has no anchor") as e:
        parse_preserve("Ann => a person")
    assert e.value.input_name == "preserve"
