"""``merged_forward``: a variant whose delta is a dense ``dW`` runs its dense linear layers as
one matmul on ``W + dW`` (the merge hook) instead of the base matmul plus a hook; the same
function, every path that removes hooks removes it, stacked slots and other kinds keep the
hook, and a declaration without the hooks it needs is refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lora_lite as ll
from lora_lite import checks
from lora_lite.testing import ToyTransformer


class ToyDense:
    """y + x dW^T with a dense trainable dW (zeros at init); merged_forward."""

    name = "t_dense"
    merged_forward = True
    additive = True

    def param_specs(d_in, d_out, cfg):
        return {"lora_D": ll.ParamSpec((d_out, d_in), init="zeros")}

    def forward(layer, x, y):
        return y + F.linear(x, layer.lora_D.to(x.dtype))

    def merge(layer, weight, bias):
        return weight + layer.lora_D.to(weight.dtype), bias


@pytest.fixture(autouse=True)
def dense_variant():
    ll.register(ToyDense)
    yield
    ll.unregister("t_dense")


def _model():
    torch.manual_seed(0)
    return ToyTransformer().eval()


def _x():
    return torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))


def _cfg(**kw):
    return ll.LoraLiteConfig(variant="t_dense", **kw)


def _hooked_reference(model, att, x):
    """The same function through hooks: base layers plus x D^T, computed without the override."""
    ref = copy.deepcopy(model)
    for t in ll.attachments(ref)[0].targets:
        t.layer.__dict__.pop("forward")
        t.layer.register_forward_hook(lambda m, a, y: y + F.linear(a[0], m.lora_D))
    with torch.no_grad():
        return ref(x)


def test_dense_linear_targets_run_one_matmul_on_the_merged_weight():
    model, x = _model(), _x()
    with torch.no_grad():
        base = model(x)
    att = ll.attach(model, _cfg())
    assert all("forward" in t.layer.__dict__ and not t.layer._forward_hooks for t in att.targets)
    with torch.no_grad():
        assert torch.equal(model(x), base)  # W + 0 is W: identity bit for bit
    checks.perturb_adapter(att, 0)
    with torch.no_grad():
        out = model(x)
    assert (out - base).abs().max() > 1e-3
    torch.testing.assert_close(out, _hooked_reference(model, att, x), rtol=0, atol=1e-5)
    model(x).sum().backward()
    assert all(t.layer.lora_D.grad is not None and t.layer.lora_D.grad.abs().sum() > 0 for t in att.targets)
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)


def test_set_active_merge_unmerge_and_detach_remove_and_restore_it():
    model, x = _model(), _x()
    att = ll.attach(model, _cfg(), name="a")
    checks.perturb_adapter(att, 0)
    layer = att.targets[0].layer
    with torch.no_grad():
        adapted = model(x)
    ll.merge(model)
    assert "forward" not in layer.__dict__
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-5)
    ll.unmerge(model)
    assert "forward" in layer.__dict__
    ll.attach(model, _cfg(), name="b")  # stacked: b's tensors live on slots, run by hooks
    ll.set_active(model, ["b"])
    assert "forward" not in layer.__dict__ and layer._forward_hooks
    ll.set_active(model, ["a", "b"])
    assert "forward" in layer.__dict__
    with ll.adapter_batch(model, ["a", "b"]):  # mixed rows: the hook path on every row
        assert "forward" not in layer.__dict__
        with torch.no_grad():
            torch.testing.assert_close(model(x)[:1], adapted[:1], rtol=0, atol=1e-5)
    assert "forward" in layer.__dict__
    ll.detach(model)
    assert "forward" not in layer.__dict__ and "lora_merged_forward" not in layer.__dict__


def test_a_deep_copy_runs_on_its_own_weights():
    model, x = _model(), _x()
    att = ll.attach(model, _cfg())
    checks.perturb_adapter(att, 0)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        before = model(x)
        for t in ll.attachments(twin)[0].targets:
            t.layer.lora_D.add_(1.0)
        assert torch.equal(model(x), before)
        assert (twin(x) - before).abs().max() > 1e-2


def test_bad_calls_fail_like_hooked_layers():
    model = _model()
    ll.attach(model, _cfg())
    with pytest.raises(ll.ForwardError, match="extra arguments"):
        model.layers[0].q_proj(_x(), torch.zeros(1))


def test_merged_forward_without_a_merge_hook_is_refused():
    class NoMerge:
        name = "t_nomerge_mf"
        merged_forward = True

        def param_specs(d_in, d_out, cfg):
            return {"lora_D": ll.ParamSpec((d_out, d_in), init="zeros")}

        def forward(layer, x, y):
            return y + F.linear(x, layer.lora_D)

    with pytest.raises(ll.PluginError, match="merged_forward but lacks a merge hook"):
        ll.register(NoMerge)
    assert "t_nomerge_mf" not in {v.name for v in ll.list_variants()}


def test_the_contract_checks_the_forward_hook_against_merge():
    """The model runs the merged weight, so only the layer-level comparison sees a forward
    hook that disagrees with merge: the merge check must fail for such a variant."""

    class Liar(ToyDense):
        name = "t_liar"

        def forward(layer, x, y):
            return y + 2 * F.linear(x, layer.lora_D.to(x.dtype))

    ll.register(Liar)
    try:
        from lora_lite.testing import VariantConformance

        kit = type("Kit", (VariantConformance,), {"variant": "t_liar"})()
        with pytest.raises(AssertionError, match="forward hooks and the merge hook disagree"):
            checks.check_merge_equals_hooked(kit.subject())
        kit.variant = "t_dense"
        assert checks.check_merge_equals_hooked(kit.subject())["layer_merge_err"] <= 1e-6
    finally:
        ll.unregister("t_liar")


def test_compiles_with_fullgraph():
    """dynamo traces the instance forward (one graph, no break) and computes the same."""
    model, x = _model(), _x()
    att = ll.attach(model, _cfg())
    checks.perturb_adapter(att, 0)
    with torch.no_grad():
        eager = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager, rtol=0, atol=1e-6)
    torch._dynamo.reset()
