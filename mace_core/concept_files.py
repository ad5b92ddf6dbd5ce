"""Concept lists from files, for runs of hundreds of concepts: a .txt file in the box's line syntax, or a table.

.txt   one concept per line, exactly as in the concepts box (concepts.py): `concept`, `concept => anchor`,
       `concept | type`, `concept => anchor | type`; blank lines and lines starting with # are skipped.
.csv   a header row naming the columns, then one concept per row:
           concept,anchor,type
           Claude Monet,,style
           Tom Hanks,a man,celebrity
           nudity,a person wearing clothes,explicit
       `concept` is required; `anchor` and `type` are optional columns, and a blank cell means the default (the node's
       type, and that type's default anchor or the node's anchor). The delimiter is the header's: ',' or ';' or a tab
       (.tsv files: tab). Quote cells that contain the delimiter. Rows whose cells are all blank and rows whose first
       cell starts with # are skipped; trailing blank cells (spreadsheet exports) are ignored; a short row's missing
       cells are blank.

Every other problem (no header, no concept column, an unknown column or type, a row wider than the header, a concept
listed twice in the box and the file together) is a MaceInputError naming the file and its line: nothing is silently
dropped. Names are normalised as in the box (whitespace runs become one space, Unicode NFC).
"""

import csv
import hashlib
import io
import os

from .concepts import (
    ANCHOR_SEP,
    CONCEPT_TYPES,
    TYPE_SEP,
    Concept,
    check_unique,
    default_concepts,
    make_concept,
    parse_entries,
    where_line,
)
from .errors import MaceInputError

INPUT = "concept_file"
COLUMNS = ("concept", "anchor", "type")
TEXT_EXT = (".txt",)
TABLE_EXT = (".csv", ".tsv")
MAX_BYTES = 16 * 2**20  # a 100k-concept list is about 3 MiB
CORPUS_INPUT = "corpus_file"
CORPUS_EXT = (".txt",)
MAX_CAPTIONS = 100_000  # each caption is one CLIP pass when the prior is first computed (then cached)


# ---------------------------------------------------------------- finding and reading the file

def resolve(root: str, relative: str, input_name: str = INPUT, exts: tuple = TEXT_EXT + TABLE_EXT) -> str:
    """root/relative for a file name typed into a node: inside root (no absolute path, no '..'), an existing file
    with a supported extension (a concept list's by default)."""
    name = (relative or "").strip()
    path = os.path.normpath(os.path.join(root, name))
    outside = os.path.isabs(name) or os.path.commonpath([os.path.abspath(root), os.path.abspath(path)]) != \
        os.path.abspath(root)
    if outside:
        raise MaceInputError(input_name, f"'{name}' points outside ComfyUI's input folder.",
                             "Put the file in the input folder and give its name relative to it, e.g. 'celebs.csv'.")
    if exts == CORPUS_EXT and not path.lower().endswith(exts):
        raise MaceInputError(input_name, f"'{name}' is not a .txt file.", "Give the captions as text, one a line.")
    if not path.lower().endswith(exts):
        raise MaceInputError(input_name, f"'{name}' is not a .txt, .csv or .tsv file.",
                             "Give a concept list as text (one concept a line) or as a table with a "
                             "'concept,anchor,type' header.")
    if not os.path.isfile(path):
        have = _candidates(root, exts)
        fix = f"Files there: {', '.join(have)}." if have else "The input folder holds no .txt or .csv files."
        raise MaceInputError(input_name, f"no file '{name}' in ComfyUI's input folder ({root}).", fix)
    return path


def _candidates(root: str, exts: tuple = TEXT_EXT + TABLE_EXT, limit: int = 10) -> list[str]:
    try:
        found = sorted(f for f in os.listdir(root) if f.lower().endswith(exts))
    except OSError:
        return []
    return found[:limit] + (["..."] if len(found) > limit else [])


def read_text(path: str, name: str = "", input_name: str = INPUT) -> str:
    """The file's text (UTF-8, with or without a byte-order mark), with clear errors for anything else."""
    name = name or os.path.basename(path)
    size = os.path.getsize(path)
    if size > MAX_BYTES:
        raise MaceInputError(input_name, f"'{name}' is {size / 2**20:.0f} MiB; a concept list is at most "
                                         f"{MAX_BYTES // 2**20} MiB.", "Split it, or check that it is the right file.")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise MaceInputError(input_name, f"{where_line(line, name)} is not UTF-8 text.",
                             "Save the file as UTF-8 (most editors and spreadsheet programs offer it).") from e


def fingerprint(root: str, relative: str, exts: tuple = TEXT_EXT + TABLE_EXT) -> str:
    """Changes whenever the named file's content does (for the nodes' cache check); '' for no file."""
    if not (relative or "").strip():
        return ""
    try:
        path = resolve(root, relative, exts=exts)
        with open(path, "rb") as f:
            return hashlib.sha256(f.read(MAX_BYTES + 1)).hexdigest()
    except (MaceInputError, OSError):
        return f"missing:{relative}"  # execute() reports the problem


# ---------------------------------------------------------------- parsing

def file_entries(text: str, name: str, concept_type: str, anchor: str = "",
                 input_name: str = INPUT) -> list[tuple[Concept, str]]:
    """Concepts of a file's text with where each is written; the extension of `name` picks the syntax."""
    ext = os.path.splitext(name)[1].lower()
    if ext in TABLE_EXT:
        return table_entries(text, name, concept_type, anchor, "\t" if ext == ".tsv" else None, input_name)
    return parse_entries(text, concept_type, anchor, input_name, source=name)


def _delimiter(header_line: str) -> str:
    for d in (",", ";", "\t"):
        if d in header_line:
            return d
    return ","


def table_entries(text: str, name: str, concept_type: str, anchor: str = "", delimiter: str | None = None,
                  input_name: str = INPUT) -> list[tuple[Concept, str]]:
    """Concepts of a table with a 'concept[,anchor][,type]' header (module docstring)."""
    from .concepts import check_concept_type

    check_concept_type(concept_type)
    rows = _rows(text, name, delimiter, input_name)
    header = None
    out = []
    for line_no, cells in rows:
        where = where_line(line_no, name)
        while cells and not cells[-1].strip():
            cells = cells[:-1]  # trailing blank cells: a spreadsheet's empty columns
        if not cells or cells[0].strip().startswith("#"):
            continue
        if header is None:
            header = _header(cells, where, input_name)
            continue
        if len(cells) > len(header):
            raise MaceInputError(input_name, f"{where} has {len(cells)} cells but the header names {len(header)} "
                                             f"columns ({', '.join(header)}).",
                                 "Quote a name that contains the delimiter, or add the column to the header.")
        row = dict(zip(header, cells))
        concept, own_anchor = row.get("concept", ""), row.get("anchor", "")
        for cell, col in ((concept, "concept"), (own_anchor, "anchor")):
            for sep in (ANCHOR_SEP, TYPE_SEP):
                if sep in cell:
                    raise MaceInputError(input_name, f"{where}: the {col} cell '{cell.strip()}' contains '{sep}'.",
                                         "In a table, put the anchor and the type in their own columns.")
        out.append((make_concept(concept, own_anchor, row.get("type", ""), concept_type, anchor, where, input_name),
                    where))
    if header is None:
        raise MaceInputError(input_name, f"'{name}' is empty.",
                             "Start it with the header 'concept,anchor,type', then one concept per row.")
    return out


def _rows(text: str, name: str, delimiter: str | None, input_name: str) -> list[tuple[int, list[str]]]:
    """(first line number, cells) per record; a quoted cell may span lines."""
    if delimiter is None:
        first = next((ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")), "")
        delimiter = _delimiter(first)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    out, line = [], 1
    try:
        for cells in reader:
            out.append((line, cells))
            line = reader.line_num + 1
    except csv.Error as e:
        raise MaceInputError(input_name, f"{where_line(reader.line_num, name)} is not valid CSV ({e}).",
                             "Check the quotes on that line.") from e
    return out


def _header(cells: list[str], where: str, input_name: str) -> list[str]:
    cols = [" ".join(c.split()).lower() for c in cells]
    known = [c for c in cols if c in COLUMNS]
    example = ",".join(COLUMNS)
    if not known:
        raise MaceInputError(input_name, f"{where} ('{','.join(cells)}') is not a header naming the columns.",
                             f"Start the file with a header row, e.g. '{example}' (anchor and type are optional), "
                             "or save a plain list as .txt.")
    if "concept" not in cols:
        raise MaceInputError(input_name, f"{where}: the header ({', '.join(cols)}) has no 'concept' column.",
                             f"Name the column of concept names 'concept', e.g. '{example}'.")
    unknown = [c for c in cols if c not in COLUMNS]
    if unknown:
        raise MaceInputError(input_name, f"{where}: unknown column '{unknown[0] or '(blank)'}' in the header.",
                             f"Columns are {', '.join(COLUMNS)} (anchor and type optional; types: "
                             f"{', '.join(CONCEPT_TYPES)}).")
    twice = [c for c in COLUMNS if cols.count(c) > 1]
    if twice:
        raise MaceInputError(input_name, f"{where}: the header names column '{twice[0]}' twice.")
    return cols


# ---------------------------------------------------------------- the box and the file together

def concept_list(box_text: str, concept_type: str, anchor: str = "", file_text: str | None = None, file_name: str = "",
                 box_input: str = "concepts", file_input: str = INPUT) -> list[Concept]:
    """The box's concepts followed by the file's, each with its own type and anchor; a concept in both (or twice in
    one) is an error naming both places."""
    box = parse_entries(box_text, concept_type, anchor, box_input)
    check_unique(box, box_input)
    entries = box
    if file_text is not None:
        found = file_entries(file_text, file_name, concept_type, anchor, file_input)
        if not found:
            raise MaceInputError(file_input, f"'{file_name}' lists no concepts.",
                                 "Write one concept per line (or row, below the header).")
        box_lines = [(c, f"the concepts box {w}") for c, w in box]
        entries = box_lines + found
        check_unique(entries, file_input)
    if not entries:
        defaults = default_concepts(concept_type, anchor)
        if defaults:
            return defaults
        raise MaceInputError(box_input, "no concepts given.",
                             "Write one concept per line, e.g. 'Claude Monet', or name a concept_file.")
    return [c for c, _ in entries]


def load_concepts(box_text: str, concept_type: str, anchor: str, root: str, concept_file: str = "",
                  input_name: str = INPUT) -> list[Concept]:
    """What the nodes call: the box's concepts, then those of `concept_file` (relative to root, '' = none)."""
    if not (concept_file or "").strip():
        return concept_list(box_text, concept_type, anchor)
    path = resolve(root, concept_file, input_name)
    name = concept_file.strip()
    return concept_list(box_text, concept_type, anchor, read_text(path, name, input_name), name, file_input=input_name)


# ---------------------------------------------------------------- a caption corpus for the preservation prior

def read_corpus(root: str, relative: str, input_name: str = CORPUS_INPUT) -> list[str]:
    """Captions from a .txt file in root, one per line (blank and # lines skipped), each normalised as names are;
    the same path and size rules as a concept list. An empty corpus is an error: a prior of nothing keeps nothing."""
    path = resolve(root, relative, input_name, CORPUS_EXT)
    name = relative.strip()
    captions = [" ".join(ln.split()) for ln in read_text(path, name, input_name).splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]
    if not captions:
        raise MaceInputError(input_name, f"'{name}' holds no captions.",
                             "Write one caption per line (e.g. 'a dog running on a beach').")
    if len(captions) > MAX_CAPTIONS:
        raise MaceInputError(input_name, f"'{name}' holds {len(captions)} captions; at most {MAX_CAPTIONS} are read.",
                             "Take a sample of the captions.")
    return captions
