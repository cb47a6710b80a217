"""VB-LoRA: the shared contract, the paper's top-k mixtures (float64), one shared bank, PEFT parity."""

import pytest
import torch

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance

# the toy's widths are 16, 32 and 64: PEFT's vector_length 256 is longer than any of them, 8 divides
# all (other widths get a cut last sub-vector); a 16-vector bank keeps the mixing non-trivial
KIT = {"vector_length": 8, "num_vectors": 16, "topk": 2}


class TestVBLoRAConformance(VariantConformance):
    variant = "vblora"
    config_kwargs = KIT


NAMES = ["q_proj", "v_proj", "kv_mix", "up_proj", "down_proj"]  # 32->32, 32->16, 16->16, 32->64, 64->32


def _attach(model, **kw):
    kw = {"target_names": [rf"\.{n}$" for n in NAMES], "r": 4, **KIT, **kw}
    return ll.attach(model, ll.LoraLiteConfig(variant="vblora", **kw))


def _randomise(att, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        att.targets[0].layer.lora_vector_bank.copy_(0.3 * torch.randn(att.targets[0].layer.lora_vector_bank.shape, generator=g))
        for t in att.targets:
            for z in (t.layer.lora_logits_A, t.layer.lora_logits_B):
                z.copy_(torch.randn(z.shape, generator=g))


def _subvector(z, bank, k):
    """float64, one sub-vector: the k largest logits, softmax over them, the weighted bank rows."""
    order = torch.argsort(z, descending=True)[:k]
    w = torch.exp(z[order] - z[order].max())
    w = w / w.sum()
    return sum(w[j] * bank[order[j]] for j in range(k))


def _paper_factors(layer, k, length):
    za, zb, bank = layer.lora_logits_A.double(), layer.lora_logits_B.double(), layer.lora_bank[0].double()
    r, n_in, _ = za.shape
    n_out = zb.shape[0]
    a = torch.zeros(r, n_in * length, dtype=torch.float64)
    b = torch.zeros(n_out * length, r, dtype=torch.float64)
    for i in range(r):
        for c in range(n_in):
            a[i, c * length : (c + 1) * length] = _subvector(za[i, c], bank, k)
        for c in range(n_out):
            b[c * length : (c + 1) * length, i] = _subvector(zb[c, i], bank, k)
    return a, b


def test_width_not_divisible_by_vector_length_cuts_the_last_subvector():
    """PEFT refuses these layers; here the last sub-vector is cut to the width."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(20, 12)
    att = ll.attach(torch.nn.Sequential(layer), ll.LoraLiteConfig(variant="vblora", r=3, **KIT))
    assert layer.lora_logits_A.shape == (3, 3, 16) and layer.lora_logits_B.shape == (2, 3, 16)
    x = torch.randn(5, 20, dtype=torch.float64)
    base = x @ layer.weight.double().T + layer.bias.double()
    torch.testing.assert_close(layer(x.float()).double(), base, atol=1e-6, rtol=0)
    a0, b0 = _paper_factors(layer, 2, 8)
    _randomise(att)
    a, b = _paper_factors(layer, 2, 8)
    dw = b[:12] @ a[:, :20] - b0[:12] @ a0[:, :20]
    torch.testing.assert_close(layer(x.float()).double(), base + x @ dw.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["v_proj", "up_proj", "down_proj"])
def test_equation_matches_the_paper(name):
    torch.manual_seed(0)
    model = ToyTransformer()
    layer = getattr(model.layers[1], name)
    x = torch.randn(3, layer.in_features, dtype=torch.float64)
    att = _attach(model)
    a0, b0 = _paper_factors(layer, 2, 8)  # the factors at init: subtracted
    _randomise(att)
    a, b = _paper_factors(layer, 2, 8)
    expected = x @ (layer.weight.double() + b @ a - b0 @ a0).T + layer.bias.double()
    torch.testing.assert_close(layer(x.float()).double(), expected, atol=1e-5, rtol=1e-5)


def test_one_shared_trainable_bank():
    model = ToyTransformer()
    att = _attach(model)
    bank = att.targets[0].layer.lora_vector_bank
    assert bank.shape == (16, 8) and bank.requires_grad
    assert all(t.layer.lora_bank[0] is bank for t in att.targets)
    assert all(t.layer.lora_vector_bank.numel() == 0 for t in att.targets[1:])  # registered once
    assert sum(p is bank for p in model.parameters()) == 1
    assert sum(p is bank for p in att.trainable_parameters()) == 1  # an optimizer steps it once
    assert bank.abs().max() <= 0.02
    x = torch.randn(2, 3, 32)
    _randomise(att)
    model(x).square().mean().backward()
    assert bank.grad is not None and bank.grad.abs().sum() > 0  # every target adds into the one grad
    model.double()  # a dtype move keeps one shared copy
    assert all(t.layer.lora_bank[0] is bank for t in att.targets) and bank.dtype == torch.float64


def test_identity_at_init_is_exact_and_init_is_seeded():
    model = ToyTransformer()
    x = torch.randn(2, 3, 32)
    base = model(x)
    att = _attach(model, init_seed=3)
    assert torch.equal(model(x), base)
    again = _attach(ToyTransformer(), init_seed=3)
    other = _attach(ToyTransformer(), init_seed=4)
    for key, value in att.adapter_tensors().items():
        assert torch.equal(value, again.adapter_tensors()[key])
    assert not torch.equal(att.targets[1].layer.lora_logits_A, other.targets[1].layer.lora_logits_A)
    assert not torch.equal(att.targets[0].layer.lora_logits_A, att.targets[1].layer.lora_logits_A[:, :4])
    # PEFT's init scales: logits N(0, 0.1), bank U(+-0.02)
    z = torch.cat([t.layer.lora_logits_A.flatten() for t in att.targets])
    assert 0.08 < z.std() < 0.12


def test_without_subtract_init_it_is_peft_s_function_not_the_identity():
    model = ToyTransformer()
    x = torch.randn(2, 3, 32)
    base = model(x)
    att = _attach(model, subtract_init=False)
    assert (model(x) - base).abs().max() > 1e-4
    assert not any(k.endswith("lora_A0") and v.numel() for k, v in att.adapter_tensors().items())


def test_checkpoint_holds_bank_and_logits_only(tmp_path):
    model = ToyTransformer()
    att = _attach(model, init_seed=5)
    _randomise(att)
    x = torch.randn(2, 3, 32)
    out = model(x)
    path = ll.save(model, tmp_path / "v.safetensors")
    _, tensors = ll.read_checkpoint(path)
    assert not any(k.endswith(("lora_A0", "lora_B0")) for k in tensors)
    fresh = ToyTransformer()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    ll.load(fresh, path)
    assert torch.equal(fresh(x), out)


def test_knobs_are_validated():
    with pytest.raises(ll.ConfigError, match="topk"):
        ll.LoraLiteConfig(variant="vblora", topk=5, num_vectors=4)
    with pytest.raises(ll.ConfigError, match="init_vector_bank_bound"):
        ll.LoraLiteConfig(variant="vblora", init_vector_bank_bound=0.0)
    with pytest.raises(ll.ConfigError, match="vector_length"):
        ll.LoraLiteConfig(variant="vblora", vector_length=0)
    with pytest.raises(ll.ConfigError, match="num_vectors"):
        ll.LoraLiteConfig(variant="vblora", num_vectors=0)
    with pytest.raises(ll.ConfigError, match="init_logits_std"):
        ll.LoraLiteConfig(variant="vblora", init_logits_std=-0.1)


def test_logits_and_bank_stay_fp32_under_bf16_storage():
    att = _attach(ToyTransformer(), dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in att.trainable_parameters())


@pytest.mark.parametrize("subtract_init", [False, True])
def test_parity_with_peft(subtract_init):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    att = _attach(ours, subtract_init=subtract_init)
    if subtract_init:  # ours is PEFT's VB-LoRA on the base W - B0 A0
        with torch.no_grad():
            for t in att.targets:
                theirs.get_submodule(t.name).weight.sub_(t.layer.lora_B0 @ t.layer.lora_A0)
    cfg = peft.VBLoRAConfig(r=4, target_modules=NAMES, **KIT)
    theirs = peft.get_peft_model(theirs, cfg)
    assert len(att) == 10
    n_bank = att.targets[0].layer.lora_vector_bank.numel()
    n_ours = sum(p.numel() for p in att.trainable_parameters())
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == n_ours
    assert n_ours == n_bank + sum(t.layer.lora_logits_A.numel() + t.layer.lora_logits_B.numel() for t in att.targets)
    with torch.no_grad():
        theirs.base_model.vblora_vector_bank["default"].copy_(att.targets[0].layer.lora_vector_bank)
        for t in att.targets:
            p = theirs.get_submodule("base_model.model." + t.name)
            p.vblora_logits_A["default"].copy_(t.layer.lora_logits_A)
            p.vblora_logits_B["default"].copy_(t.layer.lora_logits_B)
    x = torch.randn(2, 5, 32)
    assert (ours(x) - theirs(x)).abs().max() <= 1e-5  # at init, with our init copied
    _randomise(att)
    with torch.no_grad():
        theirs.base_model.vblora_vector_bank["default"].copy_(att.targets[0].layer.lora_vector_bank)
        for t in att.targets:
            p = theirs.get_submodule("base_model.model." + t.name)
            p.vblora_logits_A["default"].copy_(t.layer.lora_logits_A)
            p.vblora_logits_B["default"].copy_(t.layer.lora_logits_B)
    out_ours, out_theirs = ours(x), theirs(x)
    err = (out_ours - out_theirs).abs().max().item()
    assert err <= 1e-5, err
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    bank_ours, bank_theirs = att.targets[0].layer.lora_vector_bank.grad, theirs.base_model.vblora_vector_bank["default"].grad
    assert (bank_ours - bank_theirs).abs().max() <= 1e-5 * bank_theirs.abs().max()
    for t in att.targets:
        p = theirs.get_submodule("base_model.model." + t.name)
        for ours_g, theirs_g in ((t.layer.lora_logits_A.grad, p.vblora_logits_A["default"].grad),
                                 (t.layer.lora_logits_B.grad, p.vblora_logits_B["default"].grad)):
            assert (ours_g - theirs_g).abs().max() <= 1e-5 * theirs_g.abs().max(), t.name
        w, _ = ll.get_variant("vblora").hook("merge")(t.layer, t.layer.weight.detach(), None)
        torch.testing.assert_close(w, p.get_base_layer().weight + p.get_delta_weight("default"), atol=1e-5, rtol=1e-5)
