"""AdaLoRA in PEFT's own format: ``rank_pattern`` after a budget allocation, both ways."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lora_lite as ll
from lora_lite.testing import ToyTransformer

peft = pytest.importorskip("peft")

NAMES = ["q_proj", "v_proj", "up_proj", "down_proj"]
KW = dict(r=6, alpha=4.0, target_r=2, total_step=8, tinit=1, tfinal=2, deltaT=1)


def toy():
    torch.manual_seed(0)
    return ToyTransformer().eval()


def out(model, x):
    with torch.no_grad():
        return model(x)


def trained_pair():
    """lora-lite and PEFT AdaLoRA stepped in lockstep (same tensors, same grads) past the final allocation."""
    ours, theirs = toy(), toy()
    att = ll.attach(ours, ll.LoraLiteConfig(variant="adalora", target_names=tuple(rf"\.{n}$" for n in NAMES), **KW))
    cfg = peft.AdaLoraConfig(init_r=6, lora_alpha=4, target_r=2, total_step=8, tinit=1, tfinal=2, deltaT=1,
                             target_modules=NAMES)
    theirs = peft.get_peft_model(theirs, cfg)
    g = torch.Generator().manual_seed(1)
    pairs = []
    with torch.no_grad():
        for t in att.targets:
            mod = theirs.get_submodule("base_model.model." + t.name)
            for x in ("A", "E", "B"):
                mine, peer = getattr(t.layer, f"lora_{x}"), getattr(mod, f"lora_{x}")["default"]
                mine.copy_(torch.randn(mine.shape, generator=g) * 0.3)
                peer.copy_(mine)
                pairs.append((mine, peer))
    for i in range(KW["total_step"] + 2):
        grads = [torch.randn(m.shape, generator=g) for m, _ in pairs]
        with torch.no_grad():
            for (mine, peer), gr in zip(pairs, grads):
                mine.grad, peer.grad = gr.clone(), gr.clone()
                mine.sub_(0.05 * gr)
                peer.sub_(0.05 * gr)
        ll.step(ours)
        theirs.base_model.update_and_allocate(i)
    return ours, theirs.eval(), att


def test_peft_file_with_rank_pattern_imports_and_exports_back_to_the_same_file(tmp_path):
    ours, theirs, att = trained_pair()
    theirs.save_pretrained(str(tmp_path / "peft"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    pattern = config["rank_pattern"]
    assert set(pattern) == {f"{t.name}.lora_E" for t in att.targets}
    assert sum(map(sum, pattern.values())) == 2 * len(att)
    saved = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    q = att.targets[0].name
    assert saved[f"base_model.model.{q}.lora_A"].shape[0] == sum(pattern[f"{q}.lora_E"]) < 6  # PEFT dropped rows

    x = torch.randn(2, 5, 32)
    loaded = peft.PeftModel.from_pretrained(toy(), str(tmp_path / "peft")).eval()
    want = out(loaded, x)
    assert (want - out(toy(), x)).abs().max() > 1e-3
    torch.testing.assert_close(out(ours, x), want, rtol=0, atol=1e-5)  # lockstep: the same adapter

    fresh = toy()
    back = ll.import_peft(fresh, tmp_path / "peft")
    assert back.cfg.r == 6 and back.cfg.target_r == 2
    for t in back.targets:
        keep = torch.tensor(pattern[f"{t.name}.lora_E"])
        assert t.layer.lora_mask.bool().tolist() == keep.tolist()
        assert torch.equal(t.layer.lora_A[keep], saved[f"base_model.model.{t.name}.lora_A"])
        assert torch.equal(t.layer.lora_B[:, keep], saved[f"base_model.model.{t.name}.lora_B"])
        assert not t.layer.lora_A[~keep].any() and not t.layer.lora_E[~keep].any()
    torch.testing.assert_close(out(fresh, x), want, rtol=0, atol=1e-5)

    # lora-lite's own export of the lockstep model is PEFT's file: same pattern, same tensors
    ll.export_peft(ours, tmp_path / "ours")
    mine = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert mine["peft_type"] == "ADALORA" and mine["rank_pattern"] == pattern and mine["init_r"] == 6
    written = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert set(written) == set(saved) and all(torch.equal(written[k], saved[k]) for k in saved)
    again = peft.PeftModel.from_pretrained(toy(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(out(again, x), out(ours, x), rtol=0, atol=1e-5)


def test_a_layer_whose_masked_E_moved_is_written_whole(tmp_path):
    model = toy()
    att = ll.attach(model, ll.LoraLiteConfig(variant="adalora", target_names=(r"\.q_proj$",), **KW))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in att.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        first, second = att.targets[0].layer, att.targets[1].layer
        for layer in (first, second):
            layer.lora_mask[:3] = 0
        first.lora_E[:3] = 0  # masked and zero: dropped, the same function
        # second: masked, but its E moved since (deltaT > 1): all six triplets are written
    ll.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {f"{att.targets[0].name}.lora_E": [False] * 3 + [True] * 3}
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved[f"base_model.model.{att.targets[0].name}.lora_A"].shape[0] == 3
    assert saved[f"base_model.model.{att.targets[1].name}.lora_A"].shape[0] == 6
    x = torch.randn(2, 5, 32)
    loaded = peft.PeftModel.from_pretrained(toy(), str(tmp_path)).eval()
    torch.testing.assert_close(out(loaded, x), out(model, x), rtol=0, atol=1e-5)
    fresh = toy()
    ll.import_peft(fresh, tmp_path)
    torch.testing.assert_close(out(fresh, x), out(model, x), rtol=0, atol=1e-6)


def test_export_refuses_what_peft_cannot_load(tmp_path):
    model = toy()
    ll.attach(model, ll.LoraLiteConfig(variant="adalora", r=4, target_names=(r"\.q_proj$",)))  # no total_step
    with pytest.raises(ll.PeftInteropError, match="total_step"):
        ll.export_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
