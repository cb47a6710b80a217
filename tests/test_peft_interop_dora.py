"""DoRA both ways through PEFT's format (``use_dora``, ``lora_magnitude_vector``); runs where
the lora-lite-dora plugin is installed."""

from __future__ import annotations

import json

import pytest
import torch

import lora_lite as ll

from .support.models import tiny_qwen3, token_batch
from .test_peft_interop_export import logits, peft_logits, trained_like
from .test_peft_interop_import import peft_adapter

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.skipif("dora" not in {v.name for v in ll.list_variants()},
                                reason="the dora variant (lora-lite-dora) is not installed")


def test_dora_export_matches_peft_logits(tmp_path):
    model = tiny_qwen3()
    batch = token_batch()
    att = trained_like(model, variant="dora", target_names=("q_proj", "down_proj"))
    ours = logits(model, batch)
    assert (ours - logits(tiny_qwen3(), batch)).abs().max() > 1e-3
    ll.export_peft(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    pm, theirs = peft_logits(tmp_path, batch)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    landed = peft.get_peft_model_state_dict(pm)
    assert len(landed) == 3 * len(att)
    for name, t in att.adapter_tensors().items():
        module, _, param = name.rpartition(".")
        suffix = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}[param]
        assert torch.equal(landed[f"base_model.model.{module}.{suffix}"], t), name


def test_dora_import_matches_peft_logits(tmp_path):
    pm = peft_adapter(tmp_path, use_dora=True)
    batch = token_batch()
    model = tiny_qwen3()
    att = ll.import_peft(model, tmp_path)
    assert att.cfg.variant == "dora"
    torch.testing.assert_close(logits(model, batch), logits(pm, batch), rtol=0, atol=1e-5)
