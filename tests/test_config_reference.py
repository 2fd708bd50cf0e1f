"""docs/config-reference.md is made from the schema and cannot drift from it."""

from __future__ import annotations

import dataclasses
import re
from typing import get_args, get_type_hints

from helpers import REPO

from train import config_reference
from train.config import DataConfig, TimmOptimizerConfig, TrainConfig, _is_dataclass_type, _union_members

PAGE = REPO / config_reference.DOCS_PAGE


def schema_keys(cls: type) -> list[tuple[str, str]]:
    """(table, key) for every key of the schema, tagged unions' members included; the key's table is
    its dotted prefix, and a union member's its tag ("train.optim[sgd]" for SGD's keys)."""
    found = []

    def walk(section: type, table: str) -> None:
        hints = get_type_hints(section)
        for f in dataclasses.fields(section):
            tp = hints[f.name]
            members = _union_members(tp)
            if members is not None:
                for member in members:
                    walk(member, f"{table}.{f.name}[{member().name}]")
            elif _is_dataclass_type(tp):
                walk(tp, f"{table}.{f.name}")
            else:
                found.append((table, f.name))
                for member in get_args(tp):  # a value that may also be a table (train_crop_size)
                    if _is_dataclass_type(member):
                        walk(member, f"{table}.{f.name}")

    walk(cls, "data" if cls is DataConfig else "train")
    return found


def test_the_committed_page_is_what_the_schema_writes():
    """A key added to the schema, a changed default, bound or doc line: the page must be rewritten."""
    assert PAGE.read_text(encoding="utf-8") == config_reference.render(), (
        f"{config_reference.DOCS_PAGE} is out of date: run "
        f"python -m train.config_reference > {config_reference.DOCS_PAGE}")


def test_every_key_of_the_schema_has_a_row_with_its_doc_line():
    """The renderer skips no key: one row per plain key, holding its doc line; `name` (which picks an
    optimizer or schedule) and the free-form `[model]` get a heading instead; the keys any other
    (timm) optimizer passes through (`args`) a line under its heading."""
    page = config_reference.render()
    expected = []
    for cls in (DataConfig, TrainConfig):
        expected += [name for table, name in schema_keys(cls)
                     if name not in ("model", "args") and not (name == "name" and table.endswith("]"))]
    rows = re.findall(r"^\| `([a-z0-9_]+)` \|", page, re.M)
    assert sorted(rows) == sorted(expected)
    for cls in (DataConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata["doc"] in page, f.name
    assert "`[model]`" in page and '`name = "sgd-sam"`' in page and '`name = "constant"`' in page
    timm_args = next(f for f in dataclasses.fields(TimmOptimizerConfig) if f.name == "args").metadata["doc"]
    assert "#### Any other `name`" in page and f"Other keys: {timm_args}" in page


def test_every_key_is_declared_with_a_doc_line():
    """key() refuses a key without its line, so the page can always say what each key does."""
    import pytest

    from train.config import key

    with pytest.raises(TypeError, match="doc"):
        key(1)
