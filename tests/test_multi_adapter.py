"""Several adapters per model and per layer: stacking, names, set_active, save/load by name,
hot-swap under torch.compile, mixed-adapter batches. References are computed independently:
the paper's LoRA equation on the layer's own tensors, or a model carrying one adapter alone."""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll
from lora_lite.testing import ToyTransformer


def toy():
    torch.manual_seed(0)
    return ToyTransformer().eval()


def lora(**kw):
    return ll.LoraLiteConfig(**{"variant": "lora", "r": 4, "alpha": 8, **kw})


def randomize(att, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in att.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


X = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(9))


def test_two_loras_on_one_layer_add_both_deltas_and_each_alone_after_set_active():
    model = toy()
    base = model(X).detach()
    math_ = ll.attach(model, lora(target_names=(r"q_proj$",)), name="math")
    code = ll.attach(model, lora(target_names=(r"q_proj$",), r=2), name="code")
    randomize(math_, 1), randomize(code, 2)
    q = model.layers[0].q_proj
    slot = q.lora_code
    h = model.layers[0].norm(X)
    expected = (h @ q.weight.T + q.bias + 2.0 * h @ q.lora_A.T @ q.lora_B.T + 4.0 * h @ slot.lora_A.T @ slot.lora_B.T)
    torch.testing.assert_close(q(h), expected, atol=1e-5, rtol=1e-5)
    assert {"layers.0.q_proj.lora_A", "layers.0.q_proj.lora_code.lora_A"} <= set(model.state_dict())
    both = model(X).detach()

    ll.set_active(model, ["math"])
    torch.testing.assert_close(q(h), h @ q.weight.T + q.bias + 2.0 * h @ q.lora_A.T @ q.lora_B.T, atol=1e-5, rtol=1e-5)
    assert [(a.name, a.active) for a in ll.attachments(model)] == [("math", True), ("code", False)]
    assert len(q._forward_hooks) == 1  # the inactive one costs nothing: no hook
    ll.set_active(model, [])
    assert torch.equal(model(X), base)
    ll.set_active(model, ["math", "code"])
    assert torch.equal(model(X), both)


def test_stacked_save_load_round_trip_and_detaching_one_leaves_the_other(tmp_path):
    model = toy()
    a = ll.attach(model, lora(target_names=(r"q_proj$", r"v_proj$")), name="math")
    b = ll.attach(model, lora(target_names=(r"q_proj$",), r=2), name="code")
    randomize(a, 1), randomize(b, 2)
    out = model(X).detach()
    path = ll.save(model, tmp_path / "both.safetensors")
    fresh = toy()
    loaded = ll.load(fresh, path)
    assert [x.name for x in loaded] == ["math", "code"]
    assert torch.equal(fresh(X), out)

    only_math = toy()
    ll.load(only_math, ll.save(model, tmp_path / "math.safetensors", names=["math"]))
    b.detach()  # the other stays, exactly as if it had been alone
    assert torch.equal(model(X), only_math(X))
    assert "layers.0.q_proj.lora_code.lora_A" not in model.state_dict()
    # a slot-held adapter saved alone loads onto a bare model (keys match on target and tensor)
    model2 = toy()
    randomize(ll.attach(model2, lora(target_names=(r"v_proj$",)), name="x"), 4)
    c = ll.attach(model2, lora(target_names=(r"v_proj$",), r=2), name="code")
    randomize(c, 3)
    ref = model2(X).detach()
    ll.set_active(model2, ["code"])
    alone = model2(X).detach()
    bare = toy()
    (got,) = ll.load(bare, ll.save(model2, tmp_path / "code.safetensors", names=["code"]))
    assert got.name == "code" and torch.equal(bare(X), alone) and not torch.equal(alone, ref)


def test_detaching_a_weight_rewriting_attachment_under_another_is_refused():
    model = toy()
    ll.attach(model, ll.LoraLiteConfig(variant="pissa", r=2, target_names=(r"q_proj$",)), name="p")
    top = ll.attach(model, lora(target_names=(r"q_proj$",)), name="top")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.AttachError, match=r"detach \['top'\] first"):
        ll.attachments(model)[0].detach()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    top.detach()
    ll.attachments(model)[0].detach()
    assert torch.equal(model(X), toy()(X))


def test_hot_swap_replaces_tensors_in_place_without_recompiling(tmp_path):
    import torch._dynamo

    model = toy()
    att = ll.attach(model, lora(), name="task")
    randomize(att, 1)
    first = model(X).detach()
    ids = {k: id(v) for k, v in att.adapter_tensors().items()}
    randomize(att, 2)
    other = ll.save(model, tmp_path / "other.safetensors")
    second = model(X).detach()
    randomize(att, 1)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    torch._dynamo.utils.counters.clear()
    torch.testing.assert_close(compiled(X), first)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    (swapped,) = ll.load(model, other, name="task")
    assert swapped is att and {k: id(v) for k, v in att.adapter_tensors().items()} == ids
    torch.testing.assert_close(compiled(X), second)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "the hot-swap recompiled"
    with pytest.raises(ll.CheckpointMismatchError, match=r"r=8 and the file r=4; .* attach with hotswap_rank"):
        bigger = toy()
        ll.attach(bigger, lora(r=8), name="task")
        ll.load(bigger, other, name="task")


def test_mixed_adapter_batch_matches_each_adapter_alone_row_by_row():
    model = toy()
    a = ll.attach(model, lora(), name="a")
    b = ll.attach(model, ll.LoraLiteConfig(variant="vera", r=4, target_names=(r"q_proj$", r"up_proj$")), name="b")
    randomize(a, 1), randomize(b, 2)
    ids = ["a", None, "b", "a"]
    x = torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(3))
    alone = {}
    for name in ("a", "b"):
        ll.set_active(model, [name])
        alone[name] = model(x).detach()
    ll.set_active(model, [])
    alone[None] = model(x).detach()
    ll.set_active(model, ["a", "b"])
    with ll.adapter_batch(model, ids):
        mixed = model(x)
    for i, name in enumerate(ids):
        torch.testing.assert_close(mixed[i], alone[name][i], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(alone["a"], alone["b"])
    both = model(x)  # the usual hooks are back
    assert not torch.allclose(both, alone["a"])
    with pytest.raises(ll.ForwardError, match="batch of 4 examples .* with 3 ids"):
        with ll.adapter_batch(model, ["a", "b", None]):
            model(x)
    assert torch.equal(model(x), both)


def test_mixed_batch_refuses_non_additive_variants_and_unknown_names():
    model = toy()
    ll.attach(model, ll.LoraLiteConfig(variant="ia3", target_names=(r"q_proj$",)), name="s")
    ll.attach(model, lora(target_names=(r"v_proj$",)), name="a")
    out = model(X)
    with pytest.raises(ll.ConfigError, match=r"additive variants only.*\['ia3'\]"):
        with ll.adapter_batch(model, ["s", "a", None]):
            pass
    with pytest.raises(ll.NotAttachedError, match=r"no attachment \['zz'\]"):
        with ll.adapter_batch(model, ["zz", "a", None]):
            pass
    assert torch.equal(model(X), out)


def test_hot_swap_of_other_ranks_and_alphas_into_a_padded_attachment_does_not_recompile(tmp_path):
    """PEFT's compiled hot-swap: attach with hotswap_rank, then load adapters of other ranks
    and alphas in place; each equals that adapter loaded normally into a fresh model."""
    import torch._dynamo

    files, refs = [], []
    for r, alpha, rslora in ((2, 4.0, False), (6, 3.0, True), (4, 16.0, False)):
        ref = toy()
        randomize(ll.attach(ref, lora(r=r, alpha=alpha, use_rslora=rslora)), r)
        files.append(ll.save(ref, tmp_path / f"r{r}.safetensors"))
        refs.append(ref(X).detach())
    model = toy()
    att = ll.attach(model, lora(r=4, hotswap_rank=8), name="serve")
    assert att.targets[0].layer.lora_A.shape[0] == 8
    ids = {k: id(v) for k, v in att.adapter_tensors().items()}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    torch._dynamo.utils.counters.clear()
    ll.load(model, files[0], name="serve")
    torch.testing.assert_close(compiled(X), refs[0], atol=1e-6, rtol=1e-6)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for path, ref in zip(files[1:], refs[1:]):
        ll.load(model, path, name="serve")
        torch.testing.assert_close(compiled(X), ref, atol=1e-6, rtol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "a hot-swap of another rank recompiled"
    assert {k: id(v) for k, v in att.adapter_tensors().items()} == ids
    # too large a rank, or an attachment without padding: typed errors, nothing copied
    big = toy()
    randomize(ll.attach(big, lora(r=9, alpha=9.0)), 9)
    too_big = ll.save(big, tmp_path / "r9.safetensors")
    before = {k: v.clone() for k, v in att.adapter_tensors().items()}
    with pytest.raises(ll.CheckpointMismatchError, match="rank 9 > hotswap_rank=8"):
        ll.load(model, too_big, name="serve")
    assert all(torch.equal(v, before[k]) for k, v in att.adapter_tensors().items())
    plain = toy()
    ll.attach(plain, lora(r=4), name="serve")
    with pytest.raises(ll.CheckpointMismatchError, match="attach with hotswap_rank"):
        ll.load(plain, files[1], name="serve")
