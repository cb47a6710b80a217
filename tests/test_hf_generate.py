"""generate() with an adapter attached: token for token the base at init, different after training."""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll

from .support.kits import calibration_for, config_kwargs
from .support.models import tiny_qwen3, token_batch

pytest.importorskip("transformers")

VARIANTS = [v.name for v in ll.list_variants()]


def _generate(model, prompt):
    with torch.no_grad():
        return model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_equals_base_at_init_and_differs_after_training(variant, tmp_path):
    model = tiny_qwen3(0)
    prompt = token_batch(128, batch=2, seq=6, seed=4)
    base = _generate(model, prompt)
    assert base.shape == (2, 18)
    knobs = config_kwargs(variant)
    cfg = ll.LoraLiteConfig(**{"variant": variant, "r": 4, "alpha": 8, **knobs})
    att = ll.attach(model, cfg, calibration_data=calibration_for(variant, token_batch(128, seed=5)))
    assert torch.equal(_generate(model, prompt), base)

    # teach the adapter a different continuation: the base's own output, shifted by one token
    target = (base + 1) % 128
    opt = torch.optim.AdamW(att.trainable_parameters(), lr=3e-2)
    for _ in range(30):
        loss = model(input_ids=target, labels=target).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    trained = _generate(model, prompt)
    assert torch.equal(trained[:, :6], prompt["input_ids"])
    assert not torch.equal(trained, base)

    # the KV-cache path and the full-sequence path agree with the adapter attached
    with torch.no_grad():
        logits = model(input_ids=trained[:, :-1]).logits
    assert torch.equal(logits[:, 5:].argmax(-1), trained[:, 6:])

    fresh = tiny_qwen3(0)
    ll.load(fresh, ll.save(model, tmp_path / "gen.safetensors"))
    assert torch.equal(_generate(fresh, prompt), trained)
    ll.detach(fresh)
    assert torch.equal(_generate(fresh, prompt), base)
