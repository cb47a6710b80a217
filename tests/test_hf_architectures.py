"""Every installed variant on seven transformers architectures built from config:
attach (default targeting, or by name), identity at init, one training step that moves
the adapter and only the adapter, save, load into a fresh model: logits equal exactly."""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll

from .support.hf_tiny_models import ARCHS
from .support.kits import calibration_for, config_kwargs

pytest.importorskip("transformers")

VARIANTS = [v.name for v in ll.list_variants()]


def _cfg(variant: str, **kw) -> ll.LoraLiteConfig:
    knobs = config_kwargs(variant)
    return ll.LoraLiteConfig(**{"variant": variant, "r": 4, "alpha": 8, **knobs, **kw})


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_default_targeting_train_save_load_exact(arch, variant, tmp_path):
    spec = ARCHS[arch]
    model = spec.build(0)
    batch = spec.batch()
    base = _logits(model, batch)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    att = ll.attach(model, _cfg(variant), calibration_data=calibration_for(variant, batch))
    names = att.target_names
    assert names and not any("lm_head" in n or "embed" in n for n in names)
    # tied output heads (BERT's cls.predictions.decoder is the word-embedding tensor) are skipped
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    assert not [t.name for t in att.targets if id(t.layer.weight) in embeddings]
    assert (_logits(model, batch) - base).abs().max().item() <= 1e-5, "identity at init"

    params = att.trainable_parameters()
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    loss = model(**batch).loss
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads), sorted(grads)[:5]
    opt.step()
    moved = [not torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True)]
    assert any(moved), "one step moved no adapter tensor"
    trained = _logits(model, batch)
    assert (trained - base).abs().max().item() > 1e-6, "training changed nothing"

    path = ll.save(model, tmp_path / "adapter.safetensors")
    fresh = spec.build(0)
    ll.load(fresh, path)
    assert torch.equal(_logits(fresh, batch), trained)
    # the base tensors of the trained model are untouched once the adapter is gone
    ll.detach(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, base_state[k]), k


@pytest.mark.parametrize("arch", list(ARCHS))
def test_targeting_by_name_selects_query_and_value(arch, tmp_path):
    spec = ARCHS[arch]
    model = spec.build(0)
    batch = spec.batch()
    att = ll.attach(model, _cfg("lora", target_names=spec.qv_names))
    assert len(att.targets) == spec.qv_count, att.target_names
    opt = torch.optim.AdamW(att.trainable_parameters(), lr=1e-2)
    model(**batch).loss.backward()
    opt.step()
    trained = _logits(model, batch)
    fresh = spec.build(0)
    ll.load(fresh, ll.save(model, tmp_path / "qv.safetensors"))
    assert torch.equal(_logits(fresh, batch), trained)
