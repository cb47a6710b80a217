"""DeLoRA: the shared contract, the paper's equation, parity with PEFT's DeLoRA."""

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance


class TestDeLoRAConformance(VariantConformance):
    variant = "delora"
    # each normalised rank-1 term has strength lambda/r as soon as B leaves zero, so
    # lambda sets the update's norm relative to the weight norms; the paper's 15 suits
    # LLM widths, and on this 32-wide toy model it overshoots (loss x3 after one step)
    config_kwargs = {"lambda0": 1.0}


def test_equation_and_weight_norms():
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    x = torch.randn(3, 12)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="delora", r=4, lambda0=3.0))
    torch.testing.assert_close(layer.lora_w_norm, layer.weight.norm(dim=0))
    with torch.no_grad():
        layer.lora_B.normal_()
    a, b, lam = layer.lora_A, layer.lora_B, layer.lora_lambda
    delta = b @ torch.diag(lam / 4 / (a.norm(dim=1) * b.norm(dim=0))) @ a * layer.lora_w_norm[None, :]
    expected = x @ (layer.weight + delta).T + layer.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_lambda_is_fp32_and_trains_under_bf16_storage():
    model = ToyTransformer()
    att = ll.attach(model, ll.LoraLiteConfig(variant="delora", r=4, dtype=torch.bfloat16))
    lam = model.layers[0].q_proj.lora_lambda
    assert lam.dtype == torch.float32 and model.layers[0].q_proj.lora_A.dtype == torch.bfloat16
    assert lam.item() == 15.0
    assert len(att.trainable_parameters()) == 3 * len(att)


def test_knob_validation():
    with pytest.raises(ll.ConfigError, match="lambda0"):
        ll.LoraLiteConfig(variant="delora", lambda0=-1.0)
    with pytest.raises(ll.ConfigError, match="lambda0"):
        ll.LoraLiteConfig(variant="delora", lambda0="big")


def test_parity_with_peft():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    names = ["q_proj", "k_proj", "down_proj"]
    theirs = peft.get_peft_model(theirs, peft.DeloraConfig(r=4, delora_lambda=15, target_modules=names))
    att = ll.attach(ours, ll.LoraLiteConfig(variant="delora", r=4, lambda0=15.0, target_names=[rf"\.{n}$" for n in names]))
    n_peft = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert n_peft == sum(p.numel() for p in att.trainable_parameters())
    with torch.no_grad():
        for t in att.targets:
            p = theirs.get_submodule("base_model.model." + t.name)
            t.layer.lora_B.normal_()
            t.layer.lora_lambda.fill_(7.5)
            p.delora_A["default"].copy_(t.layer.lora_A)
            p.delora_B["default"].copy_(t.layer.lora_B)
            p.delora_lambda["default"].copy_(t.layer.lora_lambda)
            torch.testing.assert_close(t.layer.lora_w_norm, p.delora_w_norm["default"])
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_fp16_model_identity_and_finite_gradients():
    """At init B = 0 clamps its norm to 1e-4, so the per-rank scale is ~1e5: past fp16's range
    if computed in the activation dtype (it was: every gradient was NaN)."""
    torch.manual_seed(0)
    model = ToyTransformer().half()
    x = torch.randn(2, 6, 32).half()
    base = model(x).detach()
    att = ll.attach(model, ll.LoraLiteConfig(variant="delora", r=4))  # the paper's lambda0 = 15
    out = model(x)
    assert torch.equal(out.detach(), base)
    out.float().pow(2).mean().backward()
    grads = {k: p.grad for k, p in att.adapter_tensors().items() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.float().norm()) for g in grads.values()) > 0
