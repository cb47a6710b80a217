"""Gradient checkpointing with a frozen base: adapter gradients equal the ones without it,
reentrant or not; the "element 0 of tensors does not require grad" trap is reproduced
and fixed by lora_lite.hf.enable_gradient_checkpointing."""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll

from .support.kits import calibration_for, config_kwargs
from .support.models import tiny_qwen3, token_batch

pytest.importorskip("transformers")
from lora_lite.hf import enable_gradient_checkpointing  # noqa: E402

VARIANTS = [v.name for v in ll.list_variants()]


def _attached(variant: str):
    model = tiny_qwen3(0, layers=3).train()
    knobs = config_kwargs(variant)
    cfg = ll.LoraLiteConfig(**{"variant": variant, "r": 4, "alpha": 8, **knobs})
    att = ll.attach(model, cfg, calibration_data=calibration_for(variant, token_batch(128, seed=6)))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # move off init so every adapter tensor has a non-zero gradient
        for p in att.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model, att


def _grads(model, att) -> dict[str, torch.Tensor]:
    batch = token_batch(128, seq=12)
    model.zero_grad(set_to_none=True)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    return {k: p.grad.clone() for k, p in att.adapter_tensors().items() if p.requires_grad}


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpointed_gradients_match(variant, use_reentrant):
    model, att = _attached(variant)
    plain = _grads(model, att)
    assert all(g.abs().max() > 0 for g in plain.values())
    enable_gradient_checkpointing(model, use_reentrant=use_reentrant)
    checkpointed = _grads(model, att)
    assert plain.keys() == checkpointed.keys()
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=1e-5, atol=1e-7, msg=k)
    assert not [n for n, p in model.named_parameters() if p.grad is not None and ".lora_" not in n]


def test_reentrant_trap_is_reproduced_then_fixed():
    model, att = _attached("lora")
    plain = _grads(model, att)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()  # what a frozen-base model without the fix looks like
    with pytest.warns(UserWarning, match="requires_grad"), pytest.raises(RuntimeError, match="does not require grad"):
        _grads(model, att)
    enable_gradient_checkpointing(model, use_reentrant=True)
    fixed = _grads(model, att)
    for k in plain:
        torch.testing.assert_close(fixed[k], plain[k], rtol=1e-5, atol=1e-7, msg=k)
