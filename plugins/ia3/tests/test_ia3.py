"""IA3 / IA3-FF: the shared contract, the paper's equations, both placements in one model,
and parity with PEFT's IA3 (``feedforward_modules``) given the same gate vectors."""

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance

KV = (r"\.k_proj$", r"\.v_proj$")
FF = (r"\.down_proj$",)


class TestIA3Conformance(VariantConformance):
    variant = "ia3"


class TestIA3FFConformance(VariantConformance):
    variant = "ia3_ff"


def test_equations_gate_output_with_bias_and_input_without():
    torch.manual_seed(0)
    out_layer, in_layer = nn.Linear(12, 10), nn.Linear(12, 10)
    ll.attach(nn.Sequential(out_layer), ll.LoraLiteConfig(variant="ia3"))
    ll.attach(nn.Sequential(in_layer), ll.LoraLiteConfig(variant="ia3_ff"))
    assert out_layer.lora_l.shape == (10,) and in_layer.lora_l.shape == (12,)
    with torch.no_grad():
        out_layer.lora_l.uniform_(0.5, 1.5)
        in_layer.lora_l.uniform_(0.5, 1.5)
    x = torch.randn(3, 12)
    w, b = out_layer.weight, out_layer.bias
    torch.testing.assert_close(out_layer(x), (x @ w.T + b) * out_layer.lora_l, atol=1e-6, rtol=1e-6)
    w, b = in_layer.weight, in_layer.bias
    torch.testing.assert_close(in_layer(x), (x * in_layer.lora_l) @ w.T + b, atol=1e-6, rtol=1e-6)


def test_gates_stay_fp32_under_bf16_storage():
    model = ToyTransformer()
    ll.attach(model, ll.LoraLiteConfig(variant="ia3", dtype=torch.bfloat16, target_names=KV))
    ll.attach(model, ll.LoraLiteConfig(variant="ia3_ff", dtype=torch.bfloat16, target_names=FF))
    for name in ("k_proj", "v_proj", "down_proj"):
        gate = getattr(model.layers[0], name).lora_l
        assert gate.dtype == torch.float32 and bool((gate == 1).all())


def test_overlapping_placements_are_refused():
    model = ToyTransformer()
    ll.attach(model, ll.LoraLiteConfig(variant="ia3", target_names=KV))
    with pytest.raises(ll.AlreadyAttachedError, match="disjoint"):
        ll.attach(model, ll.LoraLiteConfig(variant="ia3_ff", target_names=(r"\.v_proj$",)))
    assert len(ll.attachments(model)) == 1


def _paired(seed=0):
    """Our toy model with ia3 on k/v and ia3_ff on down_proj; PEFT's IA3 with the same vectors."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    theirs = peft.get_peft_model(
        theirs, peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    kv = ll.attach(ours, ll.LoraLiteConfig(variant="ia3", target_names=KV))
    ff = ll.attach(ours, ll.LoraLiteConfig(variant="ia3_ff", target_names=FF))
    with torch.no_grad():
        for t in [*kv.targets, *ff.targets]:
            t.layer.lora_l.uniform_(0.5, 1.5)
            theirs.get_submodule("base_model.model." + t.name).ia3_l["default"].copy_(
                t.layer.lora_l.view_as(theirs.get_submodule("base_model.model." + t.name).ia3_l["default"])
            )
    return ours, theirs, kv, ff


def test_parity_with_peft_both_placements():
    ours, theirs, kv, ff = _paired()
    n_peft = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert n_peft == sum(p.numel() for a in (kv, ff) for p in a.trainable_parameters())
    x = torch.randn(2, 5, 32)
    err = (ours(x) - theirs(x)).abs().max().item()
    assert err <= 1e-5, f"IA3 + IA3-FF vs PEFT: max abs error {err:.2e}"
