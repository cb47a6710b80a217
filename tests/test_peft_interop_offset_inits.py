"""CorDA and LoRA-GA in PEFT's format. In PEFT both are LoRA inits that rewrite the base
weight to W - s B0 A0 from calibration data (CorDA: activations; LoRA-GA: a gradient);
lora-lite keeps W and saves A0, B0. Export writes the rank-2r LoRA delta against the
ORIGINAL weight, what PEFT's save_pretrained(path_initial_model_for_weight_conversion=...)
writes; PEFT's converted file imports as plain lora; an unconverted file is refused."""

import dataclasses
import json
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

import lora_lite as ll
from lora_lite.testing import ToyTransformer

peft = pytest.importorskip("peft")

NAMES = ["q_proj", "kv_mix", "down_proj"]
R, ALPHA = 4, 6
installed = {v.name for v in ll.list_variants()}


def toy():
    torch.manual_seed(0)
    return ToyTransformer().eval()


def _trained_alike(ours, att, pm):
    """Perturb lora-lite's A, B as training would and give PEFT the same values."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in att.targets:
            mod = pm.get_submodule("base_model.model." + t.name)
            for mine, peer in ((t.layer.lora_A, mod.lora_A["default"].weight),
                               (t.layer.lora_B, mod.lora_B["default"].weight)):
                mine.add_(0.05 * torch.randn(mine.shape, generator=g))
                peer.copy_(mine)
    return ours, att, pm


def _corda(monkeypatch, tmp_path):
    """The same trained CorDA adapter in both libraries (PEFT's init, lora-lite's init, both
    then given lora-lite's perturbed A, B), PEFT's initial adapter saved for its conversion."""
    try:
        import attr  # noqa: F401  (PEFT 0.21's corda.py imports attrs, not a PEFT dependency)
    except ImportError:
        monkeypatch.setitem(sys.modules, "attr", types.SimpleNamespace(dataclass=dataclasses.dataclass))
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    ours, theirs = toy(), toy()
    xs = [torch.randn(1, 24, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    pcfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=NAMES, init_lora_weights="corda",
                           corda_config=CordaConfig(corda_method="kpm"))
    preprocess_corda(theirs, pcfg, run_model=lambda: [theirs(x) for x in xs])
    pm = peft.get_peft_model(theirs, pcfg).eval()
    pm.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial adapter as a plain LoRA
    pm.save_pretrained(str(tmp_path / "initial"))
    pm.peft_config["default"].init_lora_weights = "corda"
    att = ll.attach(ours, ll.LoraLiteConfig(variant="corda", r=R, alpha=ALPHA, corda_method="kpm",
                                            target_names=[rf"\.{n}$" for n in NAMES]), calibration_data=xs)
    return _trained_alike(ours, att, pm)


def _lora_ga(monkeypatch, tmp_path):
    """The same trained LoRA-GA adapter in both libraries (PEFT's init, lora-lite's init, both
    then given lora-lite's perturbed A, B), PEFT's initial adapter saved for its conversion."""
    real = torch.svd_lowrank

    def seeded(*a, **k):  # PEFT draws from the global RNG; ours from a per-layer seed: give both the same
        torch.manual_seed(0)
        return real(*a, **k)

    monkeypatch.setattr(torch, "svd_lowrank", seeded)
    ours, theirs = toy(), toy()
    x = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(1))
    pcfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=NAMES, init_lora_weights="lora_ga",
                           lora_ga_config=peft.LoraGAConfig(direction="ArBr", scale="gd_scale"))
    peft.preprocess_loraga(theirs, pcfg, lambda: theirs(x).float().pow(2).mean().backward())
    pm = peft.get_peft_model(theirs, pcfg).eval()
    pm.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial adapter as a plain LoRA
    pm.save_pretrained(str(tmp_path / "initial"))
    pm.peft_config["default"].init_lora_weights = "lora_ga"
    att = ll.attach(ours, ll.LoraLiteConfig(variant="lora_ga", r=R, alpha=ALPHA, direction="ArBr", scale="gd_scale",
                                            target_names=[rf"\.{n}$" for n in NAMES]), calibration_data=[x])
    return _trained_alike(ours, att, pm)


@pytest.fixture(params=["corda", "lora_ga"])
def trained(request, monkeypatch, tmp_path):
    if request.param not in installed:
        pytest.skip(f"{request.param} not installed")
    return {"corda": _corda, "lora_ga": _lora_ga}[request.param](monkeypatch, tmp_path)



def out(model, x):
    with torch.no_grad():
        return model(x)


def test_export_is_peft_converted_lora_onto_the_original_base(tmp_path, trained):
    ours, att, pm = trained
    x = torch.randn(2, 5, 32)
    want = out(ours, x)
    assert (want - out(toy(), x)).abs().max() > 1e-3, "the adapter must change the outputs"
    ll.export_peft(ours, tmp_path / "ours")
    pm.save_pretrained(str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    mine, theirs = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft"))
    for key in ("peft_type", "r", "lora_alpha", "init_lora_weights", "use_rslora", "use_dora", "rank_pattern"):
        assert mine.get(key, {} if key == "rank_pattern" else None) == theirs[key], key
    assert (mine["r"], mine["lora_alpha"]) == (2 * R, 2 * ALPHA)
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "peft"))
    assert set(a) == set(b)
    for k in a:  # [A; A0], [B, -B0]: A, B equal, A0, B0 from the two inits (equal to float rounding)
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    loaded = peft.PeftModel.from_pretrained(toy(), str(tmp_path / "ours")).eval()
    err = (out(loaded, x) - want).abs().max().item()
    assert err <= 1e-5, err
    torch.testing.assert_close(out(pm, x), want, rtol=0, atol=1e-5)  # PEFT's own, on W_res


def test_peft_converted_file_imports_as_lora(tmp_path, trained):
    _, att, pm = trained
    init = att.cfg.variant
    pm.save_pretrained(str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())[f"{init}_config"]  # PEFT keeps it
    model = toy()
    att = ll.import_peft(model, tmp_path / "peft")
    assert att.cfg.variant == "lora" and att.cfg.r == 2 * R
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(out(model, x), out(pm, x), rtol=0, atol=1e-5)


def test_export_then_import_is_a_lora_of_the_same_function(tmp_path, trained):
    ours, _, _ = trained
    ll.export_peft(ours, tmp_path)
    model = toy()
    att = ll.import_peft(model, tmp_path)
    assert att.cfg.variant == "lora" and (att.cfg.r, att.cfg.alpha) == (2 * R, 2 * ALPHA)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(out(model, x), out(ours, x), rtol=0, atol=1e-5)


def test_unconverted_file_is_refused_and_the_model_left_alone(tmp_path, trained):
    _, att, pm = trained
    init = att.cfg.variant
    pm.save_pretrained(str(tmp_path / "peft"))
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["init_lora_weights"] == init
    model = toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.PeftInteropError, match=rf"'{init}'.*calibration data.*path_initial_model_for_weight_conversion"):
        ll.import_peft(model, tmp_path / "peft")
    assert ll.attachments(model) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
