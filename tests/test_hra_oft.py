"""HRA and OFT across packages: parity with PEFT on a Qwen3-architecture causal LM (same
parameters, same logits), and the input-side hook on bitsandbytes layers."""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll

from torch import nn

from .support.models import tiny_qwen3, token_batch

NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    "hra": (lambda peft: peft.HRAConfig(r=4, target_modules=NAMES), {"r": 4}, "hra_u"),
    "oft": (lambda peft: peft.OFTConfig(r=0, oft_block_size=8, target_modules=NAMES), {"r": 0, "oft_block_size": 8}, "oft_R"),
    "oft_exact_cayley": (
        lambda peft: peft.OFTConfig(r=4, oft_block_size=0, use_cayley_neumann=False, target_modules=NAMES),
        {"r": 4, "oft_block_size": 0, "use_cayley_neumann": False},
        "oft_R",
    ),
}


def _peft_tensor(module, attr):
    held = getattr(module, attr)["default"]
    return held.weight if attr == "oft_R" else held


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_peft(case):
    peft = pytest.importorskip("peft")
    peft_cfg, knobs, attr = CASES[case]
    variant = case.split("_")[0]
    pytest.importorskip(f"lora_lite_{variant}")
    ours, theirs = tiny_qwen3(), tiny_qwen3()
    batch = token_batch()
    base = ours(**batch).logits.detach()
    theirs = peft.get_peft_model(theirs, peft_cfg(peft))
    att = ll.attach(ours, ll.LoraLiteConfig(variant=variant, target_names=[rf"\.{n}$" for n in NAMES], **knobs))
    assert len(att) == 14
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == sum(
        p.numel() for p in att.trainable_parameters()
    )
    torch.testing.assert_close(ours(**batch).logits, base, atol=1e-5, rtol=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in att.targets:
            (ours_tensor,) = [p for n, p in t.layer.named_parameters(recurse=False) if n.startswith("lora_")]
            ours_tensor.copy_(torch.randn(ours_tensor.shape, generator=g) * 0.2)
            _peft_tensor(theirs.get_submodule("base_model.model." + t.name), attr).copy_(ours_tensor)
    got, want = ours(**batch).logits, theirs(**batch).logits
    assert (got - base).abs().max().item() > 1e-2, "the adapters did not change the logits"
    err = (got - want).abs().max().item()
    assert err <= 1e-5, f"{case}: max |ours - peft| = {err:.2e}"


@pytest.mark.parametrize("kind", ["Linear4bit", "Linear8bitLt"])
@pytest.mark.parametrize(("variant", "knobs"), [("hra", {"r": 4}), ("oft", {"r": 0, "oft_block_size": 8})])
def test_input_side_adapters_run_on_bnb_layers(kind, variant, knobs):
    """The base layer sees the rotated input; its quantized weight is never read or changed."""
    bnb = pytest.importorskip("bitsandbytes")
    pytest.importorskip(f"lora_lite_{variant}")
    torch.manual_seed(0)
    extra = {"compute_dtype": torch.float32} if kind == "Linear4bit" else {"has_fp16_weights": False}
    layer = getattr(bnb.nn, kind)(32, 16, **extra)
    layer.load_state_dict(nn.Linear(32, 16).state_dict())
    layer = layer.to("cpu")  # quantizes
    assert ll.is_quantized(layer)
    model = nn.Sequential(layer)
    x = torch.randn(3, 32)
    base = model(x).detach()
    ll.attach(model, ll.LoraLiteConfig(variant=variant, **knobs))
    assert (model(x) - base).abs().max().item() <= 1e-5
    (adapter,) = [p for n, p in layer.named_parameters() if n.startswith("lora_")]
    with torch.no_grad():
        adapter.normal_(std=0.3)
    rotated = ll.get_variant(variant).hook("forward_input")(layer, x).detach()
    out = model(x).detach()
    assert (out - base).abs().max().item() > 1e-2
    ll.detach(model)
    assert torch.equal(model(x), base)
    assert torch.equal(model(rotated), out)
