"""The config reference page, written from the schema in ``train/config.py``.

``python -m train.config_reference > docs/config-reference.md`` rewrites the page; the test
``tests/test_config_reference.py`` fails when the committed page is not what this prints, so a
key added to the schema without its page (or a changed default) cannot go unnoticed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Literal, get_args, get_origin, get_type_hints

from .config import DataConfig, TrainConfig, _is_dataclass_type, _tag, _union_members

DOCS_PAGE = "docs/config-reference.md"

_PLAIN_TYPES = {int: "integer", float: "number", bool: "bool", str: "string"}
_BOUND_SYMBOLS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}

_INTRO = """\
# Config reference

<!-- Written by `python -m train.config_reference > docs/config-reference.md` from the schema in
train/config.py; tests/test_config_reference.py fails when this page is out of date. Edit the
schema's doc lines, not this page. -->

A run reads two TOML files: the **data file** (`--data-cfg`: where the images are and how they are
loaded) and the **train file** (`--train-cfg`: model, recipe, logging). Every key has a default
except `data_dir`; a key the schema does not know, a value of the wrong type or out of bounds stops
the run before any data is read, with one line naming the file and the key. On the command line,
`--set data.<key>=<value>` and `--set train.<key>=<value>` override any key (TOML syntax; see
[Training and configs](training.md)). A table such as `[optim]` is written `train.optim.<key>` in
`--set` and in error messages.

Types: *integer*, *number* (an integer or a decimal), *bool* (`true` or `false`), *string*, a
choice of quoted words, or a *table*. Bounds are inclusive where they say ≥ or ≤.
"""


def _describe_type(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " or ".join(f'`"{choice}"`' for choice in get_args(tp))
    if get_origin(tp) is dict:
        return "table"
    if _is_dataclass_type(tp):
        return "table (below)"
    if get_origin(tp) is not None:  # a union of choices, such as int | Literal["auto"]
        return " or ".join(_describe_type(member) for member in get_args(tp))
    return _PLAIN_TYPES[tp]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "{}"
    return repr(value)


def _default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _bounds(f: dataclasses.Field) -> str:
    parts = [f"{_BOUND_SYMBOLS[k]} {_toml(f.metadata[k])}" for k in _BOUND_SYMBOLS if f.metadata.get(k) is not None]
    return ", ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(cls: type, prefix: str, skip: tuple[str, ...] = ()) -> list[str]:
    """One row per plain key of ``cls`` (tables get sections of their own)."""
    hints = get_type_hints(cls)
    rows = ["| key | type | default | bounds | meaning |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.name in skip or _is_dataclass_type(tp) or _union_members(tp) is not None or get_origin(tp) is dict:
            continue
        rows.append(f"| `{prefix}{f.name}` | {_cell(_describe_type(tp))} | `{_toml(_default_of(f))}` | "
                    f"{_bounds(f)} | {_cell(f.metadata['doc'])} |")
    return rows if len(rows) > 2 else []


def _sections(cls: type, dotted: str, level: int) -> list[str]:
    """The plain keys of ``cls``, then a section for each of its tables, depth first."""
    lines = []
    table = _table(cls, "")
    if table:
        lines += table + [""]
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        members = _union_members(tp)
        name = f"{dotted}.{f.name}"
        if members is None and not _is_dataclass_type(tp):
            if get_origin(tp) is dict:  # a free-form table: its heading says what goes in it
                lines += [f"{'#' * level} `[{f.name}]`", "", f"`{name}`: {f.metadata['doc']}", ""]
            tables = [m for m in get_args(tp) if _is_dataclass_type(m)]
            if tables:  # a value that may also be a table, such as train_crop_size
                lines += [f"{'#' * level} `[{f.name}]`", "", f"`{name}` as a table: {tables[0].__doc__}", ""]
                lines += _table(tables[0], "") + [""]
            continue
        lines += [f"{'#' * level} `[{f.name}]`", "", f"`{name}`: {f.metadata['doc']}", ""]
        if members is None:
            lines += _sections(tp, name, level + 1)
            continue
        default = _tag(type(_default_of(f)))
        lines += [f"Chosen by `name`; the default is `name = \"{default}\"`. Each choice has its own keys:", ""]
        for member in members:
            tag = _tag(member)
            docs = {m.name: m.metadata["doc"] for m in dataclasses.fields(member)}
            heading = f'`name = "{tag}"`' if tag is not None else "Any other `name`"  # the open member
            lines += [f"{'#' * (level + 1)} {heading}", "", docs["name"], ""]
            table = _table(member, "", skip=("name",))
            lines += (table + [""]) if table else ["No other keys.", ""]
            if tag is None:  # the open member passes its other keys through
                lines += [f"Other keys: {docs['args']}", ""]
    return lines


def render() -> str:
    """The whole page, as ``docs/config-reference.md`` holds it."""
    lines = [_INTRO, "## Data file", "",
             "Keys at the top of the file (`--set data.<key>`), then its tables.", ""]
    lines += _sections(DataConfig, "data", 3)
    lines += ["## Train file", "", "Keys at the top of the file (`--set train.<key>`), then its tables.", ""]
    lines += _sections(TrainConfig, "train", 3)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.config_reference",
        description=f"Print the config reference page ({DOCS_PAGE}) made from the schema in train/config.py.")
    parser.parse_args(argv)
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
