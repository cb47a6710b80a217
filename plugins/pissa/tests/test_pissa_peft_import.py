"""PEFT's PiSSA adapter saved without conversion (init_lora_weights="pissa": the trained A, B
only) imports as lora-lite's pissa onto the ORIGINAL base: PEFT's from_pretrained recomputes
W_res with the same SVD of the same weight, and so does pissa's init."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lora_lite as ll
from lora_lite.testing import ToyTransformer

peft = pytest.importorskip("peft")

NAMES = ["q_proj", "v_proj", "down_proj"]


def toy():
    torch.manual_seed(0)
    return ToyTransformer().eval()


def saved_by_peft(directory, init="pissa", **kw):
    pm = peft.get_peft_model(toy(), peft.LoraConfig(init_lora_weights=init, target_modules=NAMES, **kw)).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(str(directory))
    return pm


@pytest.mark.parametrize("kw", [dict(r=4, lora_alpha=8), dict(r=3, lora_alpha=16, use_rslora=True)])
def test_unconverted_pissa_imports_onto_the_original_base(tmp_path, kw):
    pm = saved_by_peft(tmp_path, **kw)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        trained = pm(x)
        loaded = peft.PeftModel.from_pretrained(toy(), str(tmp_path)).eval()
        want = loaded(x)
    torch.testing.assert_close(want, trained, rtol=0, atol=0)  # PEFT's own reload: W_res recomputed
    assert (want - toy()(x)).abs().max() > 1e-2
    model = toy()
    att = ll.import_peft(model, tmp_path)
    assert att.cfg.variant == "pissa" and att.cfg.svd == "full" and att.cfg.r == kw["r"]
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    for t in att.targets:
        for name in ("lora_A", "lora_B"):
            assert torch.equal(getattr(t.layer, name), saved[f"base_model.model.{t.name}.{name}.weight"])
        w_res = loaded.get_submodule("base_model.model." + t.name).get_base_layer().weight
        torch.testing.assert_close(ll.dense_weight(t.layer), w_res, rtol=0, atol=1e-7)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # export is still the plain rank-2r LoRA against the original base
    ll.export_peft(model, tmp_path / "back")
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 2 * kw["r"]
    again = peft.PeftModel.from_pretrained(toy(), str(tmp_path / "back")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), want, rtol=0, atol=1e-5)


def test_randomized_pissa_is_refused_and_the_model_left_alone(tmp_path):
    saved_by_peft(tmp_path, init="pissa_niter_2", r=4, lora_alpha=8)
    model = toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.PeftInteropError, match=r"pissa_niter_2.*path_initial_model_for_weight_conversion"
                                                  r".*\['pissa'\] only"):
        ll.import_peft(model, tmp_path)
    assert ll.attachments(model) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
