"""EVA in PEFT's format: PEFT's EVA is a LoRA init (init_lora_weights="eva"), so both
directions copy lora_A, lora_B. The CASES entry in tests/test_peft_interop_native.py runs
the three parity tests at rho=1; here: the config entries match PEFT's own, and a file with
PEFT's rank redistribution (rho=2) imports zero-padded to one r with PEFT's logits."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lora_lite as ll
from lora_lite.testing import ToyTransformer

peft = pytest.importorskip("peft")
from peft.tuners.lora.eva import initialize_lora_eva_weights  # noqa: E402

NAMES = ["q_proj", "kv_mix", "down_proj"]


def toy():
    torch.manual_seed(0)
    return ToyTransformer().eval()


def data():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 12, 32, generator=g) for _ in range(2)]


def forward(model, batch):  # PEFT's EVA forward for tensor batches (its default expects dicts)
    return model(batch)


def peft_eva(directory, rho, adjust=True, **kw):
    pm = peft.get_peft_model(toy(), peft.LoraConfig(
        r=4, lora_alpha=6, init_lora_weights="eva", target_modules=NAMES,
        eva_config=peft.EvaConfig(rho=rho, adjust_scaling_factors=adjust), **kw)).eval()
    initialize_lora_eva_weights(pm, dataloader=data(), forward_fn=forward, prepare_model_inputs_fn=None,
                                prepare_layer_inputs_fn=None, show_progress_bar=False)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # trained
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(str(directory))
    return pm.eval()  # (EVA's calibration leaves it in train mode: dropout would be on)


def test_export_writes_peft_eva_config(tmp_path):
    peft_eva(tmp_path / "peft", rho=1.0)
    model = toy()
    ll.attach(model, ll.LoraLiteConfig(variant="eva", r=4, alpha=6, target_names=[rf"\.{n}$" for n in NAMES]),
              calibration_data=data())
    ll.export_peft(model, tmp_path / "ours")
    theirs, ours = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "ours"))
    for key in ("peft_type", "r", "lora_alpha", "init_lora_weights", "eva_config", "rank_pattern", "alpha_pattern",
                "use_rslora", "use_dora", "bias"):
        assert ours[key] == theirs[key], key


@pytest.mark.parametrize("kw", [{}, {"lora_dropout": 0.1}])
def test_redistributed_ranks_import_padded_to_one_r(tmp_path, kw):
    pm = peft_eva(tmp_path, rho=2.0, **kw)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    ranks = config["rank_pattern"]
    assert ranks and len(set(ranks.values())) > 1, "rho=2 must redistribute the ranks on this data"
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        theirs = pm(x)
        assert (theirs - toy()(x)).abs().max() > 1e-3
    model = toy()
    att = ll.import_peft(model, tmp_path)
    big = max(4, *ranks.values())
    assert att.cfg.variant == "eva" and att.cfg.r == big and att.cfg.alpha == 6 / 4 * big
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    for t in att.targets:
        a, b = (saved[f"base_model.model.{t.name}.{n}.weight"] for n in ("lora_A", "lora_B"))
        k = a.shape[0]
        assert torch.equal(t.layer.lora_A[:k], a) and torch.equal(t.layer.lora_B[:, :k], b), t.name
        assert not t.layer.lora_A[k:].any() and not t.layer.lora_B[:, k:].any(), t.name
    with torch.no_grad():
        ours = model(x)
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-5, err
    # exported back: one r everywhere, PEFT's logits
    ll.export_peft(model, tmp_path / "back")
    again = peft.PeftModel.from_pretrained(toy(), str(tmp_path / "back")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), theirs, rtol=0, atol=1e-5)


def test_redistributed_ranks_without_adjusted_scales_are_refused(tmp_path):
    peft_eva(tmp_path, rho=2.0, adjust=False)
    assert not json.loads((tmp_path / "adapter_config.json").read_text())["alpha_pattern"]
    model = toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.PeftInteropError, match="lora-lite's eva has one scale"):
        ll.import_peft(model, tmp_path)
    assert ll.attachments(model) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
