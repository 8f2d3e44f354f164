"""docs/SPEC.md is generated from the rule tables: it lists every key, and a drift fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

from sweeper import contract, spec, specdoc

SPEC_MD = Path(__file__).resolve().parent.parent / "docs" / "SPEC.md"


def test_spec_md_is_what_the_generator_writes():
    assert SPEC_MD.read_text() == specdoc.render(), "regenerate: python -m sweeper.specdoc > docs/SPEC.md"


def test_every_key_of_every_table_has_a_row():
    text = SPEC_MD.read_text()
    keys = [
        *spec.TOP_RULES,
        *spec.GRID_KEYS,
        *(k for k in contract.RECIPE_RULES if k != "seed"),
        *spec.SEARCH_RULES,
        *spec.POLICY_RULES,
        *(k for k in spec.VARIANT_KEYS if k != "description"),
    ]
    for key in keys:
        assert f"| `{key}` |" in text, key
    for section in (
        "## [grid]",
        "## [train]",
        "## [search]",
        "### [search.space]",
        "## [policy]",
        "## [variants.NAME]",
    ):
        assert section in text


def test_a_new_recipe_key_without_its_line_fails_the_generator(monkeypatch):
    monkeypatch.setitem(contract.RECIPE_RULES, "label_smoothing", contract.RECIPE_RULES["lr"])
    with pytest.raises(KeyError, match="label_smoothing"):
        specdoc.render()


def test_the_documented_defaults_are_the_code_s():
    from sweeper.storage import stale

    assert specdoc.POLICY_DEFAULTS["max_retries"] == stale.MAX_RETRY
    assert stale.policy({}) == specdoc.POLICY_DEFAULTS
    assert "| `epochs` | integer | `14` | >= 1 |" in specdoc.render()


def test_the_example_spec_is_valid():
    parsed = spec.parse(spec.tomllib.loads(specdoc.EXAMPLE_SPEC), name="example")
    assert len(parsed.cells) == 4 and parsed.variants["tiny"]["stages"] == [["a3"], ["c4"], ["b5"]]
    assert parsed.search["trials_per_cell"] == 20 and parsed.policy["max_retries"] == 2
