"""IA3 + IA3-FF, the paper's setup (output gates on k/v, input gate on the FFN down
projection) on a Qwen3-architecture model: parity with PEFT's IA3 with
``feedforward_modules``, and save / detach / load of the two attachments together."""

import pytest
import torch

import lora_lite as ll

from .support.models import tiny_qwen3, token_batch

KV = (r"\.k_proj$", r"\.v_proj$")
FF = (r"\.down_proj$",)


def biased_qwen3():
    """Qwen3 with attention biases, set non-zero: the output gate must scale them too."""
    model = tiny_qwen3(attention_bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_()
    return model


def attach_paper_setup(model):
    return (ll.attach(model, ll.LoraLiteConfig(variant="ia3", target_names=KV)),
            ll.attach(model, ll.LoraLiteConfig(variant="ia3_ff", target_names=FF)))


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_parity_with_peft_ia3_feedforward_modules():
    peft = pytest.importorskip("peft")
    ours, theirs = biased_qwen3(), biased_qwen3()
    theirs = peft.get_peft_model(theirs, peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    kv, ff = attach_paper_setup(ours)
    assert len(kv) == 4 and len(ff) == 2
    n_peft = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert n_peft == sum(p.numel() for a in (kv, ff) for p in a.trainable_parameters())
    with torch.no_grad():
        for t in [*kv.targets, *ff.targets]:
            t.layer.lora_l.uniform_(0.5, 1.5)
            gate = theirs.get_submodule("base_model.model." + t.name).ia3_l["default"]
            gate.copy_(t.layer.lora_l.view_as(gate))
    batch = token_batch(ours.config.vocab_size)
    err = (logits(ours, batch) - logits(theirs, batch)).abs().max().item()
    assert err <= 1e-5, f"IA3 + IA3-FF vs PEFT on Qwen3: max abs logit error {err:.2e}"


def test_both_placements_save_detach_load_together(tmp_path):
    model = biased_qwen3()
    batch = token_batch(model.config.vocab_size)
    base = logits(model, batch)
    base_keys = set(model.state_dict())
    kv, ff = attach_paper_setup(model)
    params = [p for a in (kv, ff) for p in a.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        loss = model(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = logits(model, batch)
    assert (trained - base).abs().max().item() > 1e-3, "training did not move the gates"
    path = ll.save(model, tmp_path / "ia3.safetensors")
    records, tensors = ll.read_checkpoint(path)
    assert [r["variant"] for r in records] == ["ia3", "ia3_ff"]
    assert sorted(tensors) == sorted([*kv.adapter_tensors(), *ff.adapter_tensors()])

    ll.detach(model)
    assert ll.attachments(model) == [] and set(model.state_dict()) == base_keys
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "detach left hooks"
    assert torch.equal(logits(model, batch), base)

    atts = ll.load(model, path)
    assert [a.cfg.variant for a in atts] == ["ia3", "ia3_ff"]
    assert torch.equal(logits(model, batch), trained)
    fresh = biased_qwen3()
    ll.load(fresh, path)
    assert torch.equal(logits(fresh, batch), trained)
    atts[1].detach()  # detach one placement: the other keeps working
    assert [a.cfg.variant for a in ll.attachments(model)] == ["ia3"]
    assert not any(m._forward_pre_hooks for m in model.modules())
    ll.detach(model)
    assert torch.equal(logits(model, batch), base)
