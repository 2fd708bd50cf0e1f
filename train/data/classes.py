"""The class table of a prepared data set: ``classes.tsv`` next to ``train/`` and ``val/``.

One row per class, in class-index order (the sorted folder names, as the loaders number
them), with a header::

    index	wnid	names
    0	n01440764	tench, Tinca tinca

``python -m train.data.prepare`` writes it from the ImageNet devkit; the trainer reads it so
an exported model carries readable label names next to its WordNet ids.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..files import write_atomically

CLASS_TABLE = "classes.tsv"
HEADER = ("index", "wnid", "names")


def write_class_table(folder: Path, rows: list[tuple[str, str]]) -> Path:
    """Write (wnid, names) rows, already in class-index order; replaced atomically."""
    path = Path(folder) / CLASS_TABLE
    for wnid, names in rows:
        if any(c in wnid + names for c in "\t\n\r"):
            raise ValueError(f"class {wnid!r}: tabs and line breaks cannot be stored in {CLASS_TABLE}")
    lines = ["\t".join(HEADER)] + [f"{index}\t{wnid}\t{names}" for index, (wnid, names) in enumerate(rows)]
    return write_atomically(path, "\n".join(lines) + "\n")


def read_class_table(folder: Path) -> dict[str, str] | None:
    """wnid -> readable names from ``folder/classes.tsv``; None when the folder has no table."""
    path = Path(folder) / CLASS_TABLE
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or tuple(lines[0].split("\t")) != HEADER:
        raise UserError(f"{path}: first line must be the header {'<tab>'.join(HEADER)}")
    table: dict[str, str] = {}
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 3 or fields[0] != str(number - 2) or not fields[1]:
            raise UserError(f"{path}, line {number}: expected '{number - 2}<tab><wnid><tab><names>', got {line!r}")
        if fields[1] in table:
            raise UserError(f"{path}, line {number}: class {fields[1]} appears twice")
        table[fields[1]] = fields[2]
    return table


def class_descriptions(folder: Path, class_names: tuple[str, ...]) -> tuple[str, ...]:
    """Readable names for ``class_names`` from the folder's class table; () when it has none.

    A table that does not cover every class is an error: a model exported with some labels
    described and others not would be misleading.
    """
    table = read_class_table(folder)
    if table is None:
        return ()
    missing = [name for name in class_names if name not in table]
    if missing:
        raise UserError(f"{Path(folder) / CLASS_TABLE} has no row for class folder(s) "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
                        "re-run python -m train.data.prepare or delete the table")
    return tuple(table[name] for name in class_names)
