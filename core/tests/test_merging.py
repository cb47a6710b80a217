"""merge / unmerge / merge_and_unload on the toy model with the lora plugin: merged equals
hooked, unmerge is bit-exact, unload leaves no trace, bad calls are typed errors."""

import pytest
import torch

import lora_lite as ll
from lora_lite.testing import ToyTransformer


def _trained():
    torch.manual_seed(0)
    model = ToyTransformer().eval()
    ll.attach(model, ll.LoraLiteConfig(variant="lora", r=4, alpha=8))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    return model, torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))


def test_merge_equals_hooked_and_unmerge_is_bit_exact():
    model, x = _trained()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooked = model(x)
    ll.merge(model)
    merged = model(x)
    torch.testing.assert_close(merged, hooked, atol=1e-5, rtol=1e-5)
    q = model.layers[0].q_proj
    expected = before["layers.0.q_proj.weight"] + 2.0 * before["layers.0.q_proj.lora_B"] @ before["layers.0.q_proj.lora_A"]
    torch.testing.assert_close(q.weight, expected, atol=1e-6, rtol=1e-6)  # the paper's W + (alpha/r) B A
    assert not q._forward_hooks and not q._forward_pre_hooks
    trained_b = q.lora_B.detach().clone()
    with torch.no_grad():
        q.lora_B.add_(1.0)  # hooks are off: no effect
    assert torch.equal(model(x), merged)
    with torch.no_grad():
        q.lora_B.copy_(trained_b)
    with pytest.raises(ll.MergeError, match="already merged"):
        ll.merge(model)
    ll.unmerge(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "unmerge is not bit-exact"
    assert torch.equal(model(x), hooked)
    with pytest.raises(ll.MergeError, match="not merged"):
        ll.unmerge(model)


def test_training_continues_after_unmerge_and_save_while_merged_reloads(tmp_path):
    model, x = _trained()
    ll.merge(model)
    path = ll.save(model, tmp_path / "a.safetensors")
    with pytest.raises(ll.MergeError, match="unmerge"):
        ll.attach(model, ll.LoraLiteConfig(variant="lora", r=2, target_names=("lm_head",), exclude_names=()))
    ll.unmerge(model)
    fresh = ToyTransformer()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    ll.load(fresh, path)
    assert torch.equal(fresh(x), model(x))
    loss = model(x).pow(2).mean()
    loss.backward()
    assert model.layers[0].q_proj.lora_B.grad is not None


def test_detach_while_merged_restores_the_base():
    torch.manual_seed(0)
    model = ToyTransformer().eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ll.attach(model, ll.LoraLiteConfig(variant="lora", r=4))
    with torch.no_grad():
        model.layers[0].q_proj.lora_B.normal_()
    ll.merge(model)
    ll.detach(model)
    assert set(model.state_dict()) == set(base)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())


def test_merge_and_unload_leaves_no_trace():
    model, x = _trained()
    hooked = model(x)
    out = ll.merge_and_unload(model)
    assert out is model and not ll.attachments(model)
    assert not any(".lora_" in k for k in model.state_dict())
    assert not any(k.startswith(("lora_", "_lora_lite")) for m in model.modules() for k in vars(m))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # as before attach
    torch.testing.assert_close(model(x), hooked, atol=1e-5, rtol=1e-5)


def test_a_variant_without_merge_hook_is_refused_before_anything_changes():
    class NoMerge:
        name = "t_nomerge"

        def param_specs(d_in, d_out, cfg):
            return {"lora_s": ll.ParamSpec((d_out,), init=0.0)}

        def forward(layer, x, y):
            return y + layer.lora_s

    ll.register(NoMerge)
    try:
        model, x = _trained()
        ll.attach(model, ll.LoraLiteConfig(variant="t_nomerge", target_names=("lm_head",), exclude_names=()))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = model(x)
        with pytest.raises(ll.MergeError, match=r"\['t_nomerge'\] have no merge hook"):
            ll.merge(model)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
        assert torch.equal(model(x), out)
        ll.detach(model)
    finally:
        ll.unregister("t_nomerge")
