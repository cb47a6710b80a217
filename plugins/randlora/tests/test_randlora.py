"""RandLoRA: the shared contract, the paper's sum of scaled random bases, shared seeded bases, PEFT parity."""

import pytest
import torch

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance


class TestRandLoRAConformance(VariantConformance):
    variant = "randlora"
    # the kit's r=4, alpha=8 (scale 2): on the toy's 16..64-wide layers that is 4..16 bases per layer


class TestRandLoRASavedSparseConformance(VariantConformance):
    variant = "randlora"
    config_kwargs = {"save_projection": True, "sparse": True}


NAMES = ["q_proj", "v_proj", "kv_mix", "up_proj", "down_proj"]  # 32->32, 32->16, 16->16, 32->64, 64->32


def _attach(model, **kw):
    kw.setdefault("target_names", [rf"\.{n}$" for n in NAMES])
    kw.setdefault("r", 4)
    kw.setdefault("alpha", 8.0)
    return ll.attach(model, ll.LoraLiteConfig(variant="randlora", **kw))


def _randomise(att, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in att.targets:
            t.layer.lora_lambda.copy_(0.3 * torch.randn(t.layer.lora_lambda.shape, generator=g))
            # gamma ~ N(0, 1/m^2), its init scale: entries of dW stay O(1), so 1e-5 is a relative test
            t.layer.lora_gamma.copy_(torch.randn(t.layer.lora_gamma.shape, generator=g) / t.layer.lora_gamma.shape[1])


def _paper_delta(layer, d_out, d_in, r, scale):
    """float64, term by term: dW = s * sum_i B_i diag(lambda_i) A diag(gamma_i), with PEFT's pairing
    of flat index j: S row j = (k, i) = divmod(j, n), Bf column j = (i', k') = divmod(j, r)."""
    lam, gam = layer.lora_lambda.double(), layer.lora_gamma.double()
    n, m = gam.shape
    big = max(d_out, d_in)
    a = layer.lora_randlora_A.double()[:, 0, :m]
    b = layer.lora_randlora_B.double()[:big, :n]
    dw = torch.zeros(big, m, dtype=torch.float64)
    for j in range(n * r):
        k, i = divmod(j, n)
        i2, k2 = divmod(j, r)
        dw += torch.outer(b[:, i2, k2], lam[k, i] * a[k] * gam[i])
    dw = scale * dw
    return dw if d_in == m else dw.T


@pytest.mark.parametrize("name", ["q_proj", "v_proj", "up_proj", "down_proj"])
def test_equation_matches_the_paper(name):
    torch.manual_seed(0)
    model = ToyTransformer()
    layer = getattr(model.layers[0], name)
    x = torch.randn(3, layer.in_features)
    att = _attach(model)
    _randomise(att)
    dw = _paper_delta(layer, layer.out_features, layer.in_features, r=4, scale=2.0)
    expected = x.double() @ (layer.weight.double() + dw).T + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_full_rank_reachable():
    """n = ceil(m / r) bases: random scalings give a rank-m update, unlike rank-r LoRA."""
    torch.manual_seed(0)
    model = ToyTransformer()
    att = _attach(model, r=3)  # m=16 -> 6 bases, m=32 -> 11
    _randomise(att)
    for t in att.targets:
        dw = _paper_delta(t.layer, t.d_out, t.d_in, r=3, scale=1.0)
        assert torch.linalg.matrix_rank(dw).item() == min(t.d_in, t.d_out)


def test_init_is_identity_and_peft_shaped():
    model = ToyTransformer()
    x = torch.randn(2, 3, 32)
    base = model(x)
    att = _attach(model)
    assert torch.equal(model(x), base)
    layer = model.layers[0].v_proj  # 32 -> 16: m = 16, n = 4
    assert layer.lora_lambda.shape == (4, 4) and layer.lora_gamma.shape == (4, 16)
    assert torch.all(layer.lora_lambda == 0) and torch.all(layer.lora_gamma == 1 / 16)
    a, b = att.targets[0].layer.lora_randlora_A, att.targets[0].layer.lora_randlora_B
    assert a.shape == (4, 1, 64) and b.shape == (64, 16, 4)  # d_out_max = d_in_max = 64
    assert all(t.layer.lora_randlora_A is a and t.layer.lora_randlora_B is b for t in att.targets)
    assert not a.requires_grad and not b.requires_grad
    assert torch.equal(a.bfloat16().float(), a)  # bf16 numbers: bf16 storage loses nothing


def test_bases_regenerate_from_the_seed():
    a1 = _attach(ToyTransformer(), projection_prng_key=3).targets[0].layer.lora_randlora_B
    a2 = _attach(ToyTransformer(), projection_prng_key=3).targets[0].layer.lora_randlora_B
    a3 = _attach(ToyTransformer(), projection_prng_key=4).targets[0].layer.lora_randlora_B
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)
    sparse = _attach(ToyTransformer(), sparse=True).targets[0].layer.lora_randlora_A
    assert len(torch.unique(sparse)) == 3


@pytest.mark.parametrize("save_projection", [False, True])
def test_checkpoint_holds_bases_only_when_asked(tmp_path, save_projection):
    model = ToyTransformer()
    att = _attach(model, save_projection=save_projection, projection_prng_key=5)
    _randomise(att)
    x = torch.randn(2, 3, 32)
    out = model(x)
    path = ll.save(model, tmp_path / "r.safetensors")
    _, tensors = ll.read_checkpoint(path)
    assert any(k.endswith("lora_randlora_B") for k in tensors) == save_projection
    fresh = ToyTransformer()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    ll.load(fresh, path)
    assert torch.equal(fresh(x), out)


def test_knobs_are_validated():
    with pytest.raises(ll.ConfigError, match="sparse"):
        ll.LoraLiteConfig(variant="randlora", sparse=True, very_sparse=True)
    with pytest.raises(ll.ConfigError):
        ll.LoraLiteConfig(variant="randlora", projection_prng_key="0")
    cfg = ll.LoraLiteConfig(variant="randlora")
    assert (cfg.r, cfg.alpha, cfg.save_projection) == (32, 640.0, False)


def test_backward_saves_no_extra_basis_sized_tensor():
    """S = (lambda (x) gamma) * A: autograd keeps lambda, gamma (and S for the matmul), not a second S."""
    layer = torch.nn.Linear(64, 64)
    ll.attach(torch.nn.Sequential(layer), ll.LoraLiteConfig(variant="randlora", r=8, alpha=16.0))
    fwd = ll.get_variant("randlora").hook("forward")
    x = torch.randn(1, 64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        fwd(layer, x, torch.zeros(1, 64))
    assert sorted(saved).count(64 * 64) <= 2  # S, and Bf (a view of the frozen basis) for the matmuls


@pytest.mark.parametrize("kw", [{}, {"very_sparse": True}])
def test_parity_with_peft(kw):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    cfg = peft.RandLoraConfig(r=4, randlora_alpha=8, target_modules=NAMES, projection_prng_key=7, **kw)
    theirs = peft.get_peft_model(theirs, cfg)
    att = _attach(ours, projection_prng_key=7, **kw)
    assert len(att) == 10
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == sum(
        p.numel() for p in att.trainable_parameters()
    )
    # same key -> PEFT's very bases; same init of the scalings
    assert torch.equal(att.targets[0].layer.lora_randlora_A, theirs.base_model.randlora_A["default"])
    assert torch.equal(att.targets[0].layer.lora_randlora_B, theirs.base_model.randlora_B["default"])
    for t in att.targets:
        p = theirs.get_submodule("base_model.model." + t.name)
        assert torch.equal(t.layer.lora_lambda, p.randlora_lambda["default"])
        assert torch.equal(t.layer.lora_gamma, p.randlora_gamma["default"])
    _randomise(att)
    with torch.no_grad():
        for t in att.targets:
            p = theirs.get_submodule("base_model.model." + t.name)
            p.randlora_lambda["default"].copy_(t.layer.lora_lambda)
            p.randlora_gamma["default"].copy_(t.layer.lora_gamma)
    x = torch.randn(2, 5, 32)
    out_ours, out_theirs = ours(x), theirs(x)
    err = (out_ours - out_theirs).abs().max().item()
    assert err <= 1e-5, err
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    for t in att.targets:
        p = theirs.get_submodule("base_model.model." + t.name)
        for ours_g, theirs_g in ((t.layer.lora_lambda.grad, p.randlora_lambda["default"].grad),
                                 (t.layer.lora_gamma.grad, p.randlora_gamma["default"].grad)):
            # relative to the tensor's largest gradient: gamma ~ 1/m gets O(m)-sized gradients
            assert (ours_g - theirs_g).abs().max() <= 1e-5 * theirs_g.abs().max(), t.name
    # merged: PEFT's merged weights equal ours
    for t in att.targets:
        p = theirs.get_submodule("base_model.model." + t.name)
        w, _ = ll.get_variant("randlora").hook("merge")(t.layer, t.layer.weight.detach().float(), None)
        torch.testing.assert_close(w, t.layer.weight + p.get_delta_weight("default"), atol=1e-5, rtol=1e-5)
