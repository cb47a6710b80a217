"""EVA on a Qwen3-architecture model against PEFT's EVA on the same padded, labelled batch.

PEFT (``get_eva_state_dict``, rho=1 so no rank redistribution) masks padding through
``attention_mask`` and ignored tokens through ``labels == -100`` and runs an incremental
PCA with a randomized SVD of q = 2r columns. With 2r >= d_in the randomized range finder
spans the whole input space, so PEFT's A is the exact centred PCA (in float32), and ours
must equal it row by row, signs included (both put each row's largest entry positive)."""

import pytest
import torch

import lora_lite as ll

from .support.models import tiny_qwen3

READERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]  # d_in = 32
R = 16


def padded_labelled_batch(vocab=128, batch=4, seq=32):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 5, 11, 3]):
        if pad:
            mask[row, -pad:] = 0
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt the loss ignores
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def ours_A(batch):
    model = tiny_qwen3()
    cfg = ll.LoraLiteConfig(variant="eva", r=R, target_names=[rf"\.{n}$" for n in READERS])
    att = ll.attach(model, cfg, calibration_data=[batch])
    return {t.name: t.layer.lora_A.detach().clone() for t in att.targets}


def test_matches_peft_eva_with_padding_and_label_masks():
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.eva import get_eva_state_dict

    batch = padded_labelled_batch()
    cfg = peft.LoraConfig(r=R, target_modules=READERS, init_lora_weights="eva", eva_config=peft.EvaConfig(rho=1.0))
    theirs = get_eva_state_dict(tiny_qwen3(), [batch], cfg, show_progress_bar=False)
    ours = ours_A(batch)
    assert sorted(theirs) == sorted(ours) and len(ours) == 12
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert worst <= 1e-4, f"EVA vs PEFT on Qwen3: max |A - A_peft| = {worst:.2e}"

    # both masks matter: calibrating on padding or on ignored tokens gives a different A
    for partial in ({"input_ids": batch["input_ids"]},
                    {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}):
        other = ours_A(partial)
        assert max((other[k] - theirs[k]).abs().max().item() for k in ours) > 1e-2


def test_reload_needs_no_calibration_data(tmp_path):
    batch = padded_labelled_batch()
    model = tiny_qwen3()
    att = ll.attach(model, ll.LoraLiteConfig(variant="eva", r=4), calibration_data=[batch])
    with torch.no_grad():
        for p in att.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
        out = model(**batch).logits
    path = ll.save(model, tmp_path / "eva.safetensors")
    fresh = tiny_qwen3()
    (loaded,) = ll.load(fresh, path)
    for k, v in att.adapter_tensors().items():
        assert torch.equal(loaded.adapter_tensors()[k], v)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, out)
