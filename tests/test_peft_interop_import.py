"""import_peft: PEFT LoRA directories -> lora-lite adapters that match PEFT's logits, or a
typed error and an untouched model."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_lite as ll
from lora_lite.integrations.peft import add_cli_commands

from .support.models import tiny_qwen3, token_batch

peft = pytest.importorskip("peft")


def peft_adapter(directory, seed=7, **cfg):
    """A PEFT LoRA adapter with every lora tensor perturbed (as training would), saved by PEFT."""
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], **cfg}
    pm = peft.get_peft_model(tiny_qwen3(), peft.LoraConfig(**kwargs)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(str(directory))
    return pm


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("cfg", [
    {},
    {"use_rslora": True, "lora_alpha": 6},
    {"layers_to_transform": [1], "lora_dropout": 0.1},
    {"target_modules": r".*\.(k_proj|up_proj)"},
])
def test_import_matches_peft_logits(tmp_path, cfg):
    pm = peft_adapter(tmp_path, **cfg)
    batch = token_batch()
    theirs = logits(pm, batch)
    model = tiny_qwen3()
    att = ll.import_peft(model, tmp_path)
    ours = logits(model, batch)
    assert (theirs - logits(tiny_qwen3(), batch)).abs().max() > 1e-3, "the adapter must change the outputs"
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert 2 * len(att) == len(saved)
    mine = att.adapter_tensors()
    for key, value in saved.items():
        assert torch.equal(mine[key.removeprefix("base_model.model.").replace(".weight", "")], value), key


def edit(directory, config=None, drop=None, add=None):
    if config:
        path = directory / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if drop or add:
        path = directory / "adapter_model.safetensors"
        tensors = load_file(str(path))
        for key in drop or ():
            del tensors[key]
        tensors.update(add or {})
        save_file(tensors, str(path))


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("change, match", [
    ({"config": {"rank_pattern": {"q_proj": 8}}}, "rank_pattern"),
    ({"config": {"alpha_pattern": {"q_proj": 8}}}, "alpha_pattern"),
    ({"config": {"bias": "all"}}, "bias='all'"),
    ({"config": {"modules_to_save": ["lm_head"]}}, "modules_to_save"),
    ({"config": {"use_dora": True}}, "lora-lite-dora|lora_magnitude_vector"),
    ({"config": {"fan_in_fan_out": True}}, "fan_in_fan_out"),
    ({"config": {"init_lora_weights": "pissa_niter_4"}}, "path_initial_model_for_weight_conversion"),
    ({"config": {"peft_type": "PROMPT_TUNING"}}, "peft_type is .PROMPT_TUNING.; the installed variants read"),
    ({"config": {"lora_alpha": None}}, "numeric 'lora_alpha'"),
    ({"drop": [f"{Q0}.lora_B.weight"]}, "without all of"),
    ({"drop": [f"{Q0}.lora_A.weight", f"{Q0}.lora_B.weight"]}, "without tensors"),
    ({"add": {"model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 32)}}, "prefix"),
    ({"add": {f"{Q0}.lora_A.bias": torch.zeros(4)}}, "not a lora weight"),
    ({"add": {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 32),
              "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": torch.zeros(64, 4)}}, "not selected"),
    ({"add": {f"{Q0}.lora_B.weight": torch.zeros(32, 3)}}, "shape"),
    ({"config": {"target_modules": "all-linear"},
      "add": {"base_model.model.model.norm.lora_A.weight": torch.zeros(4, 32),
              "base_model.model.model.norm.lora_B.weight": torch.zeros(32, 4)}}, "not linear layers"),
])
def test_unsupported_or_incomplete_adapters_fail_and_leave_the_model_alone(tmp_path, change, match):
    peft_adapter(tmp_path)
    edit(tmp_path, **change)
    model = tiny_qwen3()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.PeftInteropError, match=match):
        ll.import_peft(model, tmp_path)
    assert ll.attachments(model) == []
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())


def test_pickled_adapters_are_refused(tmp_path):
    peft_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(ll.PeftInteropError, match="never read"):
        ll.import_peft(tiny_qwen3(), tmp_path)


def cli(argv):
    parser = argparse.ArgumentParser(prog="lora-lite")
    add_cli_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_import_then_export_reproduces_peft(tmp_path):
    base_dir, peft_dir, out_dir = tmp_path / "base", tmp_path / "peft", tmp_path / "back"
    tiny_qwen3().save_pretrained(str(base_dir))
    pm = peft_adapter(peft_dir)
    checkpoint = tmp_path / "adapter.safetensors"
    assert cli(["import-peft", str(peft_dir), str(checkpoint), "--model", str(base_dir)]) == 0
    batch = token_batch()
    model = tiny_qwen3()
    ll.load(model, checkpoint)
    torch.testing.assert_close(logits(model, batch), logits(pm, batch), rtol=0, atol=1e-5)
    assert cli(["export-peft", str(checkpoint), str(out_dir), "--model", str(base_dir)]) == 0
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir) and config["task_type"] == "CAUSAL_LM"
    original, exported = (load_file(str(d / "adapter_model.safetensors")) for d in (peft_dir, out_dir))
    assert set(original) == set(exported) and all(torch.equal(original[k], exported[k]) for k in original)
