"""VB-LoRA in PEFT's own format: what export refuses (the round trips are in
tests/test_peft_interop_native.py)."""

import pytest
import torch

import lora_lite as ll
from lora_lite.testing import ToyTransformer

pytest.importorskip("peft")


@pytest.mark.parametrize("kw, match", [
    ({"vector_length": 8}, "subtract_init=True .* as_lora=True"),  # the default: not PEFT's function
    ({"vector_length": 12, "subtract_init": False}, "vector_length=12 to divide"),  # PEFT refuses such layers
])
def test_export_refuses_what_peft_cannot_express_and_writes_nothing(tmp_path, kw, match):
    model = ToyTransformer()
    ll.attach(model, ll.LoraLiteConfig(variant="vblora", num_vectors=16, target_names=(r"\.q_proj$",), **kw))
    with pytest.raises(ll.PeftInteropError, match=match):
        ll.export_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_as_lora_exports_the_default_subtract_init(tmp_path):
    model = ToyTransformer()
    att = ll.attach(model, ll.LoraLiteConfig(variant="vblora", num_vectors=16, vector_length=8,
                                             target_names=(r"\.q_proj$",)))
    with torch.no_grad():
        for p in att.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    got = ll.export_peft(model, tmp_path, as_lora=True)
    assert got.max_rel_error < 1e-5
