"""LoRA: the shared contract (plain, with dropout in training, with OLoRA init), the
equation with every knob, and numerical parity with PEFT's LoRA layer and its files."""

import json
import math

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance

NAMES = ["q_proj", "v_proj", "down_proj"]


class TestLoRAConformance(VariantConformance):
    variant = "lora"


class TestLoRADropoutConformance(VariantConformance):
    """The kit trains in the model's own mode (eval for the toy); here every training step
    runs in train mode, so the adapter's dropout is live while the loss drops."""

    variant = "lora"
    config_kwargs = {"dropout": 0.1, "use_rslora": True}

    def objective(self, model, batch):
        target = self.regression_target(model, batch)

        def loss(m):
            m.train()
            try:
                return self.loss_fn(m, batch, target)
            finally:
                m.eval()

        return loss


class TestLoRAHotswapRankConformance(VariantConformance):
    """Rank padded to hotswap_rank with zeros and a tensor scale: the whole contract holds."""

    variant = "lora"
    config_kwargs = {"hotswap_rank": 8}


class TestLoRAOLoRAConformance(VariantConformance):
    variant = "lora"
    config_kwargs = {"init": "olora"}


def _cfg(**kw):
    return ll.LoraLiteConfig(**{"variant": "lora", "r": 4, "alpha": 12, "target_names": [rf"\.{n}$" for n in NAMES], **kw})


def test_equation_matches_the_paper():
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    x = torch.randn(3, 12)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="lora", r=4, alpha=6))
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = x @ layer.weight.T + layer.bias + (6 / 4) * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_equation_with_dropout_and_rslora_in_float64(rslora):
    """y' = W x + b + s B A (m * x / (1 - p)), m the dropout mask, s = alpha / r or alpha / sqrt(r)."""
    torch.manual_seed(0)
    layer = nn.Linear(12, 10).double()
    x = torch.randn(5, 12, dtype=torch.float64)
    p, r, alpha = 0.25, 4, 6.0
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="lora", r=r, alpha=alpha, dropout=p, use_rslora=rslora,
                                                       dtype=torch.float64))
    assert layer.lora_scaling == (alpha / math.sqrt(r) if rslora else alpha / r)
    with torch.no_grad():
        layer.lora_B.normal_()
    s = alpha / (math.sqrt(r) if rslora else r)
    base = x @ layer.weight.T + layer.bias
    delta = lambda inp: s * inp @ layer.lora_A.T @ layer.lora_B.T  # noqa: E731
    layer.eval()
    torch.testing.assert_close(layer(x), base + delta(x), atol=1e-12, rtol=1e-12)
    layer.train()  # the mask itself: test_dropout_mask_acts_on_the_adapter_input_only
    assert not torch.allclose(layer(x), base + delta(x)), "dropout must act in train mode"
    # dropout touches only the adapter's input: with B = 0 the train-mode output is the base output
    with torch.no_grad():
        layer.lora_B.zero_()
    layer.train()
    torch.testing.assert_close(layer(x), base, atol=1e-12, rtol=0)


def test_dropout_mask_acts_on_the_adapter_input_only():
    """Square, invertible A and B (r = d_in = d_out): the dropped input is recoverable and is
    x * m / (1 - p) with m in {0, 1}, about a fraction p of it zero."""
    torch.manual_seed(0)
    d, p = 16, 0.5
    layer = nn.Linear(d, d).double()
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="lora", r=d, alpha=d, dropout=p, dtype=torch.float64))
    with torch.no_grad():
        layer.lora_B.copy_(torch.eye(d, dtype=torch.float64))
        layer.lora_A.copy_(torch.eye(d, dtype=torch.float64))
    x = torch.randn(64, d, dtype=torch.float64)
    layer.train()
    dropped = layer(x) - (x @ layer.weight.T + layer.bias)  # = 1 * I I (m x / (1 - p))
    ratio = dropped / x
    assert torch.all((ratio.abs() < 1e-9) | ((ratio - 1 / (1 - p)).abs() < 1e-9))
    assert 0.35 < (ratio.abs() < 1e-9).double().mean().item() < 0.65


def test_no_dropout_code_on_the_path_when_dropout_is_zero():
    model = ToyTransformer()
    att = ll.attach(model, ll.LoraLiteConfig(variant="lora", r=4, alpha=8))
    assert all("lora_op" not in t.layer.__dict__ and "lora_p" not in t.layer.__dict__ for t in att.targets)
    ll.detach(model)
    att = ll.attach(model, ll.LoraLiteConfig(variant="lora", r=4, alpha=8, dropout=0.2))
    assert all(t.layer.lora_p == 0.2 for t in att.targets)
    ll.detach(model)
    assert not any(k.startswith("lora_") for m in model.modules() for k in m.__dict__)


@pytest.mark.parametrize("kw, match", [
    ({"dropout": -0.1}, r"\[0, 1\)"),
    ({"dropout": 1.0}, r"\[0, 1\)"),
    ({"dropout": "0.1"}, "dropout"),
    ({"use_rslora": 1}, "use_rslora"),
    ({"init": "loftq"}, "not implemented"),
    ({"init": "pissa"}, "one of"),
    ({"init": True}, "init"),
])
def test_knob_validation(kw, match):
    with pytest.raises(ll.ConfigError, match=match):
        ll.LoraLiteConfig(variant="lora", **kw)


def test_olora_refusals_touch_nothing():
    model = ToyTransformer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.ConfigError, match="r <= min"):
        ll.attach(model, ll.LoraLiteConfig(variant="lora", r=20, init="olora"))  # kv_mix is 16 -> 16
    emb = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    with pytest.raises(ll.ConfigError, match="linear layers only"):
        ll.attach(emb, ll.LoraLiteConfig(variant="lora", r=2, init="olora", target_names=["^0$"], exclude_names=()))
    assert not ll.attachments(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_gaussian_init_is_peft_distribution():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(512, 256))
    att = ll.attach(lin, ll.LoraLiteConfig(variant="lora", r=8, alpha=8, init="gaussian"))
    a, b = att.targets[0].layer.lora_A, att.targets[0].layer.lora_B
    assert abs(a.std().item() - 1 / 8) < 0.005 and abs(a.mean().item()) < 0.005
    assert torch.count_nonzero(b) == 0


def test_olora_init_and_detach_restore():
    torch.manual_seed(0)
    model = ToyTransformer()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 5, 32)
    y0 = model(x)
    att = ll.attach(model, _cfg(init="olora"))
    for t in att.targets:
        w = original[t.name + ".weight"].double()
        q, r = torch.linalg.qr(w)
        # B has orthonormal columns, A upper-triangular; W_res + s B A = W
        torch.testing.assert_close(t.layer.lora_B.double().T @ t.layer.lora_B.double(), torch.eye(4, dtype=torch.float64),
                                   atol=1e-5, rtol=0)
        assert torch.allclose(t.layer.lora_A.double().tril(-1), torch.zeros(4, w.shape[1], dtype=torch.float64))
        torch.testing.assert_close(t.layer.weight.double() + 3 * t.layer.lora_B.double() @ t.layer.lora_A.double(), w,
                                   atol=1e-5, rtol=0)
    assert (model(x) - y0).abs().max() < 1e-5
    ll.detach(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


# -- PEFT parity ------------------------------------------------------------------------------


def _pair(**peft_kw):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=12, target_modules=NAMES, **peft_kw))
    return ours, theirs


def _copy_into_peft(att, theirs, perturb=True):
    with torch.no_grad():
        for t in att.targets:
            peft_layer = theirs.get_submodule("base_model.model." + t.name)
            if perturb:  # as training would; std 0.1 keeps outputs O(1), where 1e-5 is ~30x fp32 rounding
                t.layer.lora_B.normal_(std=0.1)
            peft_layer.lora_A["default"].weight.copy_(t.layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(t.layer.lora_B)


def test_parity_with_peft():
    ours, theirs = _pair()
    att = ll.attach(ours, _cfg())
    assert len(att) == 6
    n_peft = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert n_peft == sum(p.numel() for p in att.trainable_parameters())
    _copy_into_peft(att, theirs)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_dropout_and_rslora_parity_with_peft_in_eval_and_train(rslora):
    """Eval: dropout is off in both. Train: the same seed draws the same masks in both (both
    call F.dropout on the adapter input, layer by layer in the model's order)."""
    ours, theirs = _pair(lora_dropout=0.3, use_rslora=rslora)
    att = ll.attach(ours, _cfg(dropout=0.3, use_rslora=rslora))
    _copy_into_peft(att, theirs)
    assert all(t.layer.lora_scaling == theirs.get_submodule("base_model.model." + t.name).scaling["default"]
               for t in att.targets)
    x = torch.randn(2, 5, 32)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    ours.train(), theirs.train()
    torch.manual_seed(11)
    y_ours = ours(x)
    torch.manual_seed(11)
    y_theirs = theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-5, rtol=1e-5)
    torch.manual_seed(12)
    assert (ours(x) - y_ours).abs().max() > 1e-4, "another seed must draw another mask"
    # gradients too
    (y_ours.square().mean()).backward()
    (y_theirs.square().mean()).backward()
    for t in att.targets:
        pl = theirs.get_submodule("base_model.model." + t.name)
        torch.testing.assert_close(t.layer.lora_A.grad, pl.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(t.layer.lora_B.grad, pl.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4)


def test_gaussian_parity_with_peft():
    ours, theirs = _pair(init_lora_weights="gaussian")
    att = ll.attach(ours, _cfg(init="gaussian"))
    for t in att.targets:  # same distribution: A ~ N(0, 1/r^2), B = 0
        pl = theirs.get_submodule("base_model.model." + t.name)
        assert torch.count_nonzero(pl.lora_B["default"].weight) == 0 and torch.count_nonzero(t.layer.lora_B) == 0
    _copy_into_peft(att, theirs)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_olora_init_equals_peft(rslora):
    ours, theirs = _pair(init_lora_weights="olora", use_rslora=rslora)
    att = ll.attach(ours, _cfg(init="olora", use_rslora=rslora))
    for t in att.targets:
        pl = theirs.get_submodule("base_model.model." + t.name)
        torch.testing.assert_close(t.layer.lora_A, pl.lora_A["default"].weight, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(t.layer.lora_B, pl.lora_B["default"].weight, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(t.layer.weight, pl.base_layer.weight, atol=1e-5, rtol=1e-5)
    _copy_into_peft(att, theirs)  # and after "training"
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


# -- PEFT files -------------------------------------------------------------------------------


def _trained_like(model, seed=5, **kw):
    att = ll.attach(model, _cfg(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in att.adapter_tensors().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return att


@pytest.mark.parametrize("kw", [
    {"dropout": 0.1, "use_rslora": True},
    {"init": "gaussian", "use_rslora": False},
    {"init": "olora"},
    {"init": "olora", "use_rslora": True, "dropout": 0.05},
])
def test_export_loads_in_peft_and_imports_back(tmp_path, kw):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = ToyTransformer().eval()
    x = torch.randn(2, 5, 32)
    _trained_like(model, **kw)
    ours = model(x)
    ll.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    olora = kw.get("init") == "olora"
    assert config["use_rslora"] is kw.get("use_rslora", False)
    assert config["lora_dropout"] == kw.get("dropout", 0.0)
    assert config["init_lora_weights"] == ("gaussian" if kw.get("init") == "gaussian" else True)
    assert config["r"] == (8 if olora else 4)
    torch.manual_seed(0)
    base = ToyTransformer().eval()  # the original weights, also for OLoRA
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    pl = pm.get_submodule("base_model.model.layers.0.q_proj")
    assert pl.use_rslora["default"] is kw.get("use_rslora", False)
    assert pl.lora_dropout["default"].p == kw["dropout"] if kw.get("dropout") else isinstance(pl.lora_dropout["default"], nn.Identity)
    torch.testing.assert_close(pm(x), ours, atol=1e-5, rtol=0)
    # and back: the knobs come back as knobs (OLoRA comes back as its plain rank-2r delta)
    torch.manual_seed(0)
    again = ToyTransformer().eval()
    att = ll.import_peft(again, tmp_path)
    assert att.cfg.use_rslora is kw.get("use_rslora", False) and att.cfg.dropout == kw.get("dropout", 0.0)
    assert att.cfg.alpha == config["lora_alpha"] and att.cfg.init == ("gaussian" if kw.get("init") == "gaussian" else "default")
    torch.testing.assert_close(again(x), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg", [{"use_rslora": True, "lora_dropout": 0.2}, {"lora_dropout": 0.0}])
def test_import_of_a_peft_adapter_keeps_its_knobs(tmp_path, cfg):
    pytest.importorskip("peft")
    _, theirs = _pair(**cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    theirs.save_pretrained(str(tmp_path))
    torch.manual_seed(0)
    ours = ToyTransformer()
    att = ll.import_peft(ours, tmp_path)
    assert att.cfg.use_rslora is cfg.get("use_rslora", False) and att.cfg.dropout == cfg["lora_dropout"]
    assert att.cfg.alpha == 12
    x = torch.randn(2, 5, 32)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)
    ours.train(), theirs.train()
    torch.manual_seed(4)
    y = ours(x)
    torch.manual_seed(4)
    torch.testing.assert_close(y, theirs(x), atol=1e-5, rtol=0)


def test_import_refuses_an_invalid_dropout(tmp_path):
    _, theirs = _pair(lora_dropout=0.1)
    theirs.save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "lora_dropout": 1.5}))
    model = ToyTransformer()
    with pytest.raises(ll.PeftInteropError, match="dropout"):
        ll.import_peft(model, tmp_path)
    assert not ll.attachments(model)


def test_a_padded_attachment_exports_to_peft_with_its_live_scale(tmp_path):
    """hotswap_rank: after a hot-swap of a rank-2 adapter with another alpha, export_peft
    writes rank R and the alpha of the live scale; PEFT's logits equal ours."""
    peft = pytest.importorskip("peft")

    def base():
        torch.manual_seed(0)
        return ToyTransformer()

    small = base()
    att = ll.attach(small, ll.LoraLiteConfig(variant="lora", r=2, alpha=5.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in att.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = ll.save(small, tmp_path / "r2.safetensors")
    model = base()
    ll.attach(model, ll.LoraLiteConfig(variant="lora", r=4, hotswap_rank=8), name="serve")
    ll.load(model, path, name="serve")
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(model(x), small(x), atol=1e-6, rtol=1e-6)
    ll.export_peft(model, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(base(), tmp_path / "peft")
    torch.testing.assert_close(theirs(x), model(x), atol=1e-5, rtol=1e-5)
