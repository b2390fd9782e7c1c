"""docs/config.md is generated from the schema: it fails here when it drifts from it."""

from __future__ import annotations

import dataclasses

from components.config import docs
from components.config.schema import Config, ModelConfig


def test_docs_config_md_matches_the_schema():
    assert docs.main(["--check"]) == 0, "run `python -m components.config.docs`"


def test_every_field_has_a_one_line_docstring_and_reaches_the_page():
    text = docs.render()
    for prefix, cls in [("", Config), *docs._sections()]:
        documented = docs.field_docs(cls)
        for f in dataclasses.fields(cls):
            assert documented.get(f.name), f"{cls.__name__}.{f.name} has no docstring line"
            key = f"{prefix}.{f.name}" if prefix else f.name
            if not dataclasses.is_dataclass(docs._hints(cls)[f.name]):
                assert f"| `{key}` |" in text, key


def test_a_schema_change_is_drift(monkeypatch):
    before = docs.render()
    monkeypatch.setattr(docs, "field_docs", lambda cls: {})  # as if every docstring were gone
    assert docs.render() != before
    assert "`auto` \\| `grouped_mm` \\| `loop`" in before  # choices come from the enum
    assert ModelConfig.__doc__.split()[0] in before
