"""Concept lists from the box and from .txt/.csv files: mixed types, CSV tables, every malformed case."""

import pytest

from mace_core.concept_files import concept_list, fingerprint, load_concepts, read_text, resolve, table_entries
from mace_core.concepts import DEFAULT_ANCHORS, TEMPLATES, Concept, parse_concepts
from mace_core.errors import MaceInputError

MIXED = """\
Tom Hanks
Claude Monet | style
Mickey Mouse => a mouse | object
  nudity   =>  a person  wearing clothes |  Explicit
Pablo Picasso => a painter | style
"""


def test_line_syntax_mixes_types_and_anchors():
    cs = parse_concepts(MIXED, "celebrity", "a man")
    assert cs == [
        Concept("Tom Hanks", "a man", "celebrity"),  # the node's type takes the node's anchor
        Concept("Claude Monet", DEFAULT_ANCHORS["style"], "style"),  # another type: that type's default anchor
        Concept("Mickey Mouse", "a mouse", "object"),
        Concept("nudity", "a person wearing clothes", "explicit"),  # whitespace and case normalised
        Concept("Pablo Picasso", "a painter", "style"),
    ]
    # each concept's prompts come from its own type's templates and anchor
    for c in cs:
        assert c.prompts() == [t.format(c.name) for t in TEMPLATES[c.concept_type]]
        assert c.prompts(anchor=True) == [t.format(c.anchor) for t in TEMPLATES[c.concept_type]]


def test_old_syntax_unchanged():
    cs = parse_concepts("Claude Monet\n\n  Pablo   Picasso => a painter \n# comment", "style")
    assert cs == [Concept("Claude Monet", "art", "style"), Concept("Pablo Picasso", "a painter", "style")]


@pytest.mark.parametrize("text,fragment", [
    ("Tom | animal", "unknown concept type 'animal'"),
    ("Tom | style => art", "anchor before the type"),
    ("Tom | style | object", "more than one '|'"),
    ("Tom |", "no type after it"),
    ("| style", "has a type but no concept"),
    ("Tom => a => b", "more than one '=>'"),
    ("Tom | celebrity\ntom | style", "listed twice (line 1 and line 2)"),
    ("a person | celebrity", "same as its anchor"),
])
def test_bad_lines_name_the_line(text, fragment):
    with pytest.raises(MaceInputError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")) \
            as e:
        parse_concepts(text, "celebrity")
    assert e.value.input_name == "concepts" and "line" in str(e.value)


CSV = """\
concept,anchor,type
Tom Hanks,,
Claude Monet,,style
"Smith, John",a man,celebrity

nudity,a person wearing clothes,explicit
# a comment row
Mickey Mouse,a mouse,object,,
"""


def test_csv_columns_defaults_and_quoting():
    cs = concept_list("", "celebrity", "", CSV, "list.csv")
    assert cs == [
        Concept("Tom Hanks", "a person", "celebrity"),
        Concept("Claude Monet", "art", "style"),
        Concept("Smith, John", "a man", "celebrity"),
        Concept("nudity", "a person wearing clothes", "explicit"),
        Concept("Mickey Mouse", "a mouse", "object"),  # trailing blank cells of a spreadsheet export ignored
    ]


def test_csv_optional_columns_any_order_and_delimiters():
    assert concept_list("", "style", "", "concept\nClaude Monet\n", "a.csv") == \
        [Concept("Claude Monet", "art", "style")]
    assert concept_list("", "style", "", "Type;Concept\nobject;a red car\n", "a.csv") == \
        [Concept("a red car", "an object", "object")]
    assert concept_list("", "style", "", "concept\tanchor\nClaude Monet\ta painter\n", "a.tsv") == \
        [Concept("Claude Monet", "a painter", "style")]
    # a short row: the missing cells are blank
    assert concept_list("", "style", "", "concept,anchor,type\nClaude Monet\n", "a.csv") == \
        [Concept("Claude Monet", "art", "style")]


def test_box_and_file_together_in_order():
    cs = concept_list("Tom Hanks\nClaude Monet | style", "celebrity", "", "concept,type\na red car,object\n",
                      "more.csv")
    assert [c.name for c in cs] == ["Tom Hanks", "Claude Monet", "a red car"]
    txt = concept_list("", "celebrity", "", "\n\nTom Hanks\n  \nClaude Monet | style\n", "list.txt")
    assert [(c.name, c.concept_type) for c in txt] == [("Tom Hanks", "celebrity"), ("Claude Monet", "style")]


@pytest.mark.parametrize("text,name,fragment", [
    ("Claude Monet,art,style\n", "a.csv", "'a.csv' line 1 ('Claude Monet,art,style') is not a header"),
    ("anchor,type\nart,style\n", "a.csv", "'a.csv' line 1: the header (anchor, type) has no 'concept' column"),
    ("concept,notes\nTom,x\n", "a.csv", "'a.csv' line 1: unknown column 'notes'"),
    ("concept,concept\nTom,Ann\n", "a.csv", "names column 'concept' twice"),
    ("concept,type\nTom,animal\n", "a.csv", "'a.csv' line 2: unknown concept type 'animal'"),
    ("concept,type\n\n\nTom,celebrity\nAnn,\ntom,style\n", "a.csv", "listed twice ('a.csv' line 4 and 'a.csv' line 6)"),
    ("concept\nSmith, John\n", "a.csv", "'a.csv' line 2 has 2 cells but the header names 1 columns"),
    ("concept,anchor\n,a man\n", "a.csv", "'a.csv' line 2 has an anchor but no concept"),
    ("concept,type\n ,style\n", "a.csv", "'a.csv' line 2 has a type but no concept"),
    ("concept\nTom => a man\n", "a.csv", "'a.csv' line 2: the concept cell 'Tom => a man' contains '=>'"),
    ("concept\n(Tom:1.2)\n", "a.csv", "'a.csv' line 2 ('(Tom:1.2)') contains"),
    ('concept\n"Tom\n', "a.csv", "not valid CSV"),
    ("", "a.csv", "'a.csv' is empty"),
    ("# only a comment\n\n", "a.txt", "'a.txt' lists no concepts"),
    ("concept,anchor,type\n\n", "a.csv", "'a.csv' lists no concepts"),
    ("Tom\nTom | style\n", "a.txt", "listed twice ('a.txt' line 1 and 'a.txt' line 2)"),
    ("Tom | animal\n", "a.txt", "'a.txt' line 1: unknown concept type"),
    ("Claude Monet\n", "a.txt", "listed twice (the concepts box line 1 and 'a.txt' line 1)"),
])
def test_malformed_files_name_file_and_line(text, name, fragment):
    with pytest.raises(MaceInputError) as e:
        concept_list("Claude Monet", "celebrity", "", text, name)
    assert e.value.input_name == "concept_file"
    assert fragment in str(e.value), str(e.value)


def test_nothing_anywhere_names_the_box():
    with pytest.raises(MaceInputError, match="no concepts given") as e:
        concept_list("  \n# none\n", "celebrity")
    assert e.value.input_name == "concepts"


def test_files_in_the_input_folder(tmp_path):
    (tmp_path / "celebs.csv").write_text("concept,anchor,type\nTom Hanks,,\nClaude Monet,,style\n",
                                         encoding="utf-8-sig")  # a spreadsheet's byte-order mark
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more.txt").write_text("a red car | object\n")
    cs = load_concepts("Ann Lee", "celebrity", "", str(tmp_path), "celebs.csv")
    assert [c.name for c in cs] == ["Ann Lee", "Tom Hanks", "Claude Monet"]
    assert load_concepts("", "celebrity", "", str(tmp_path), " sub/more.txt ")[0].concept_type == "object"
    assert load_concepts("Ann Lee", "celebrity", "", str(tmp_path), "") == [Concept("Ann Lee", "a person", "celebrity")]
    for bad, fragment in [("../x.csv", "outside"), ("/etc/passwd", "outside"),
                          ("missing.csv", "Files there: celebs.csv"), ("celebs.json", "not a .txt, .csv or .tsv")]:
        with pytest.raises(MaceInputError, match=fragment) as e:
            load_concepts("Ann Lee", "celebrity", "", str(tmp_path), bad)
        assert e.value.input_name == "concept_file"
    (tmp_path / "latin1.txt").write_bytes("Tom\nBeyonc\xe9\n".encode("latin-1"))
    with pytest.raises(MaceInputError, match="'latin1.txt' line 2 is not UTF-8"):
        read_text(resolve(str(tmp_path), "latin1.txt"), "latin1.txt")
    before = fingerprint(str(tmp_path), "celebs.csv")
    assert before and fingerprint(str(tmp_path), "celebs.csv") == before and fingerprint(str(tmp_path), "") == ""
    (tmp_path / "celebs.csv").write_text("concept\nTom Hanks\n")
    assert fingerprint(str(tmp_path), "celebs.csv") != before


def test_thousand_rows_parse_quickly():
    rows = "\n".join(f"person {i},,{['celebrity', 'style', 'object', 'explicit'][i % 4]}" for i in range(1000))
    cs = table_entries("concept,anchor,type\n" + rows, "big.csv", "celebrity")
    assert len(cs) == 1000 and {c.concept_type for c, _ in cs} == {"celebrity", "style", "object", "explicit"}
    assert cs[2][0].anchor == DEFAULT_ANCHORS["object"] and cs[999][1] == "'big.csv' line 1001"
