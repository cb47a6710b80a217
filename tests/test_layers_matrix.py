"""Every installed variant on every layer kind (Linear, bnb 4-bit nf4/fp4, bnb 8-bit,
GPT-2 Conv1D): either the full contract holds or attach raises a typed LoraLiteError and
leaves the model untouched. The support table in docs/layers.md is rendered from these
cells and must match them."""

from __future__ import annotations

import warnings

import pytest

from .support import layer_support as support

pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

CELLS = [(v, knobs, kind) for v, knobs in support.rows() for kind in support.KINDS]


def _measure(variant, knobs, kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return support.measure(variant, tuple(sorted(knobs.items())), kind)


@pytest.mark.parametrize(
    "variant,knobs,kind", CELLS, ids=[f"{support.row_label(v, k)}|{kind}" for v, k, kind in CELLS]
)
def test_layers_cell(variant, knobs, kind):
    cell = _measure(variant, knobs, kind)
    assert cell.status in ("yes", "approx", "refused")
    if cell.status == "approx":  # only an explicit requantizing opt-in may trade identity for quantization
        assert knobs and support.KINDS[kind][1] is not None


def test_layers_foundation_variants_cover_every_kind_as_claimed():
    """What the foundation variants' docstrings claim, checked against the cells."""
    for kind, (_, setting) in support.KINDS.items():
        assert _measure("lora", {}, kind).status == "yes"  # lora declares embeddings and convolutions too
        if setting in support.BY_NAME:  # the others take linear-like layers only: a typed refusal
            for variant in ("delora", "pissa"):
                cell = _measure(variant, {}, kind)
                assert (cell.status, cell.detail) == ("refused", "TargetingError"), (variant, kind, cell)
            continue
        assert _measure("delora", {}, kind).status == "yes"
        expected = "refused" if setting else "yes"
        assert _measure("pissa", {}, kind).status == expected
        assert _measure("pissa", {"quantized": "requantize"}, kind).status == ("approx" if setting else "yes")
    assert _measure("pissa", {}, "bnb 4-bit nf4").detail == "WeightAccessError"


def test_layers_support_table_is_current():
    table = support.render({
        (support.row_label(v, knobs), kind): _measure(v, knobs, kind) for v, knobs, kind in CELLS
    })
    assert support.committed_table() == table, (
        "docs/layers.md's support table is stale (variants or layer kinds changed). Regenerate it with\n"
        "    python -m tests.support.layer_support --write\n"
        f"Measured now:\n{table}"
    )
