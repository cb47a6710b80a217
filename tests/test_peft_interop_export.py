"""export_peft: lora-lite adapters -> PEFT directories that PeftModel.from_pretrained reproduces."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lora_lite as ll

from .support.models import tiny_qwen3, token_batch

peft = pytest.importorskip("peft")


def trained_like(model, variant="lora", seed=5, **cfg):
    """Attach and give every adapter tensor non-trivial values (as training would)."""
    att = ll.attach(model, ll.LoraLiteConfig(variant=variant, r=4, alpha=8.0, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in att.adapter_tensors().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return att


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def peft_logits(directory, batch, seed=0):
    base = tiny_qwen3(seed)
    pm = peft.PeftModel.from_pretrained(base, str(directory)).eval()
    return pm, logits(pm, batch)


def peft_lora_tensors(pm):
    sd = peft.get_peft_model_state_dict(pm)
    return {k: v for k, v in sd.items()}


@pytest.mark.parametrize("cfg, leaves", [
    ({}, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ({"target_names": ("q_proj", "v_proj"), "layers": (1,)}, None),
])
def test_lora_export_matches_peft_logits(tmp_path, cfg, leaves):
    model = tiny_qwen3()
    batch = token_batch()
    att = trained_like(model, **cfg)
    ours = logits(model, batch)
    assert (ours - logits(tiny_qwen3(), batch)).abs().max() > 1e-3, "the adapter must change the outputs"
    ll.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["target_modules"] == (leaves or att.target_names)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(saved) == 2 * len(att) and all(k.startswith("base_model.model.model.layers.") for k in saved)
    pm, theirs = peft_logits(tmp_path, batch)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    # every tensor landed in PEFT (it would only warn otherwise) and nothing else was created
    landed = peft_lora_tensors(pm)
    assert set(landed) == set(saved)
    for k, v in saved.items():
        assert torch.equal(landed[k], v), k


def test_pissa_export_loads_onto_the_original_base(tmp_path):
    model = tiny_qwen3()
    batch = token_batch()
    trained_like(model, variant="pissa")
    ours = logits(model, batch)
    ll.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16.0 and config["init_lora_weights"] is True
    _, theirs = peft_logits(tmp_path, batch)  # a fresh, unmodified base model
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_export_then_import_round_trips_exactly(tmp_path):
    model = tiny_qwen3()
    att = trained_like(model)
    ll.export_peft(model, tmp_path)
    fresh = tiny_qwen3()
    att2 = ll.import_peft(fresh, tmp_path)
    assert att2.target_names == att.target_names and att2.cfg.alpha / att2.cfg.r == 2.0
    a, b = att.adapter_tensors(), att2.adapter_tensors()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_export_refuses_what_peft_cannot_express(tmp_path):
    with pytest.raises(ll.NotAttachedError):
        ll.export_peft(tiny_qwen3(), tmp_path / "none")
    model = tiny_qwen3()
    ll.attach(model, ll.LoraLiteConfig(variant="goft"))  # no PEFT counterpart
    with pytest.raises(ll.PeftInteropError, match="goft.*declares no PEFT format.*lora"):
        ll.export_peft(model, tmp_path / "delora")
    model = tiny_qwen3()
    ll.attach(model, ll.LoraLiteConfig(variant="lora", r=4, target_names=("q_proj",)))
    ll.attach(model, ll.LoraLiteConfig(variant="lora", r=2, target_names=("v_proj",)))
    with pytest.raises(ll.PeftInteropError, match="2 attachments"):
        ll.export_peft(model, tmp_path / "two")
    assert not any(p.exists() for p in (tmp_path / "none", tmp_path / "delora", tmp_path / "two"))


@pytest.mark.parametrize("variant,knobs", [("dora", {}), ("oft", {"r": 0, "oft_block_size": 8}), ("hra", {}),
                                           ("pissa", {}), ("vera", {})])
def test_as_lora_export_of_any_mergeable_variant_loads_in_peft_within_its_reported_error(tmp_path, variant, knobs):
    model = tiny_qwen3()
    att = ll.attach(model, ll.LoraLiteConfig(**{"variant": variant, "r": 4, "alpha": 8.0, **knobs}))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in att.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)
    batch = token_batch()
    ours = logits(model, batch)
    assert (ours - logits(tiny_qwen3(), batch)).abs().max() > 1e-3  # the adapter matters
    got = ll.export_peft(model, tmp_path / "lora", as_lora=True)
    assert got.max_rel_error < 1e-5 and got.path == tmp_path / "lora"
    assert "measured max relative error" in (tmp_path / "lora" / "README.md").read_text()
    _, theirs = peft_logits(tmp_path / "lora", batch)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)

    # a smaller rank: the measured error is returned, and PEFT's logits move by about that much
    small = ll.export_peft(model, tmp_path / "r1", as_lora=True, rank=1)
    assert set(small.ranks.values()) == {1}
    _, approx = peft_logits(tmp_path / "r1", batch)
    if small.max_rel_error > 1e-3:
        assert (approx - ours).abs().max() > 1e-6
    cfg = json.loads((tmp_path / "r1" / "adapter_config.json").read_text())
    assert cfg["r"] == 1 and cfg["lora_alpha"] == 1 and not cfg["rank_pattern"]


def test_as_lora_carries_a_bias_change_in_lora_bias(tmp_path):
    from lora_lite.testing import ToyTransformer

    torch.manual_seed(0)
    model = ToyTransformer().eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    att = ll.attach(model, ll.LoraLiteConfig(variant="ia3", target_names=(r"q_proj$", r"k_proj$")))
    with torch.no_grad():
        for p in att.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(2, 5, 32)
    ours = model(x).detach()
    got = ll.export_peft(model, tmp_path / "ia3", as_lora=True)
    cfg = json.loads((tmp_path / "ia3" / "adapter_config.json").read_text())
    assert cfg["lora_bias"] is True and got.max_rel_error < 1e-5
    assert set(got.ranks.values()) == {32, 16} and list(cfg["rank_pattern"].values()) == [16] * 2  # k_proj: 16 outputs
    fresh = ToyTransformer()
    fresh.load_state_dict(base)
    pm = peft.PeftModel.from_pretrained(fresh.eval(), str(tmp_path / "ia3")).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(x), ours, atol=1e-4, rtol=0)
