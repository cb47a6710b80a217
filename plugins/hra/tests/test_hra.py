"""HRA: the shared contract, the paper's chain of reflections, PEFT's init and parity."""

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance


class TestHRAConformance(VariantConformance):
    variant = "hra"


def _chain(u: torch.Tensor) -> torch.Tensor:
    """H = (I - 2 v1 v1^T) ... (I - 2 vr vr^T), one reflection at a time (the paper's form)."""
    h = torch.eye(u.shape[0], dtype=u.dtype)
    for i in range(u.shape[1]):
        v = u[:, i : i + 1] / u[:, i].norm()
        h = h @ (torch.eye(u.shape[0], dtype=u.dtype) - 2 * v @ v.T)
    return h


def test_equation_matches_the_paper():
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="hra", r=6))
    with torch.no_grad():
        layer.lora_U.normal_()  # break the pairs: a general chain of 6 reflections
    x = torch.randn(3, 12)
    w64 = layer.weight.double() @ _chain(layer.lora_U.double())
    expected = x.double() @ w64.T + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_init_is_paired_and_the_chain_is_the_identity():
    torch.manual_seed(0)
    layer = nn.Linear(64, 8)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="hra", r=8))
    u = layer.lora_U
    assert torch.equal(u[:, 0::2], u[:, 1::2])
    assert len({tuple(c) for c in u.T.tolist()}) == 4, "the four pairs should differ"
    # kaiming-uniform(a=sqrt(5)) at fan-in r/2 = 4: uniform in +-sqrt(2/r) = +-0.5
    assert 0.45 < u.abs().max().item() <= 0.5
    torch.testing.assert_close(_chain(u.double()), torch.eye(64, dtype=torch.float64), atol=1e-12, rtol=0)


def test_odd_r_is_refused():
    with pytest.raises(ll.ConfigError, match="even r"):
        ll.attach(ToyTransformer(), ll.LoraLiteConfig(variant="hra", r=3))


def test_u_stays_fp32_under_bf16_storage_and_most_entries_train():
    torch.manual_seed(0)
    model = ToyTransformer()
    att = ll.attach(model, ll.LoraLiteConfig(variant="hra", r=4, dtype=torch.bfloat16))
    assert all(p.dtype == torch.float32 for p in att.trainable_parameters())
    start = [p.detach().clone() for p in att.trainable_parameters()]
    opt = torch.optim.AdamW(att.trainable_parameters(), lr=1e-4, weight_decay=0.0)
    x = torch.randn(4, 6, 32)
    for _ in range(3):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = sum(int((p != s).sum()) for p, s in zip(att.trainable_parameters(), start))
    assert moved > 0.9 * sum(s.numel() for s in start)


def _saved_numel(layer, tokens):
    x = torch.randn(tokens, layer.in_features, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        ll.get_variant("hra").hook("forward_input")(layer, x)
    return sum(saved)


def test_backward_keeps_one_activation_copy_not_r():
    """Per token, autograd keeps x (d_in) and x V (r) for the hook, not r reflected copies."""
    layer = nn.Linear(64, 64)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="hra", r=16))
    per_token = (_saved_numel(layer, 300) - _saved_numel(layer, 100)) / 200
    assert per_token == 64 + 16


def test_init_and_parity_with_peft():
    peft = pytest.importorskip("peft")
    names = ["q_proj", "kv_mix", "down_proj"]
    torch.manual_seed(0)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    torch.manual_seed(1)
    theirs = peft.get_peft_model(theirs, peft.HRAConfig(r=4, target_modules=names))
    torch.manual_seed(1)
    att = ll.attach(ours, ll.LoraLiteConfig(variant="hra", r=4, target_names=[rf"\.{n}$" for n in names]))
    assert len(att) == 6
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == sum(
        p.numel() for p in att.trainable_parameters()
    )
    x = torch.randn(2, 5, 32)
    for t in att.targets:  # same RNG stream, same init: PEFT's scale, not 8x off
        torch.testing.assert_close(t.layer.lora_U, theirs.get_submodule("base_model.model." + t.name).hra_u["default"], atol=0, rtol=0)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for t in att.targets:
            t.layer.lora_U.normal_()
            theirs.get_submodule("base_model.model." + t.name).hra_u["default"].copy_(t.layer.lora_U)
    err = (ours(x) - theirs(x)).abs().max().item()
    assert err <= 1e-5, err
