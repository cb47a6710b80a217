"""transformers.Trainer trains an attached model on a tiny in-code dataset; the callback
writes adapter-only checkpoints on the Trainer's schedule that reload exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lora_lite as ll

from .support.models import tiny_qwen3, token_batch

transformers = pytest.importorskip("transformers")
from lora_lite.hf import AdapterCheckpointCallback  # noqa: E402


def _dataset(n: int = 8, seq: int = 8) -> list[dict[str, torch.Tensor]]:
    ids = token_batch(128, batch=n, seq=seq, seed=3)["input_ids"]
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]


def _args(out, **kw) -> transformers.TrainingArguments:
    base = dict(
        output_dir=str(out), max_steps=6, per_device_train_batch_size=8, learning_rate=2e-2,
        save_strategy="steps", save_steps=2, logging_steps=1, report_to="none", use_cpu=True,
        disable_tqdm=True, seed=0,
    )
    return transformers.TrainingArguments(**{**base, **kw})


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _train(tmp_path, callback, **kw):
    model = tiny_qwen3(0)
    att = ll.attach(model, ll.LoraLiteConfig(variant="lora", r=4, alpha=8))
    start = {k: v.detach().clone() for k, v in att.adapter_tensors().items()}
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, **kw), train_dataset=_dataset(),
                                   callbacks=[callback])
    trainer.train()
    return model, att, start, trainer


def test_trainer_trains_and_writes_adapter_only_checkpoints(tmp_path):
    model, att, start, trainer = _train(tmp_path, AdapterCheckpointCallback())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < 0.95 * losses[0], losses
    assert all(not torch.equal(v.detach(), start[k]) for k, v in att.adapter_tensors().items())
    assert not [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]

    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert folders == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for name in folders:
        files = sorted(p.name for p in (tmp_path / name).iterdir())
        assert files == ["adapter.safetensors", "trainer_state.json"], files  # no full model, no optimizer
    assert (tmp_path / "checkpoint-6" / "adapter.safetensors").stat().st_size < 100_000

    batch = {k: v for k, v in token_batch(128).items()}
    trained = _logits(model, batch)
    fresh = tiny_qwen3(0)
    ll.load(fresh, tmp_path / "checkpoint-6" / "adapter.safetensors")
    assert torch.equal(_logits(fresh, batch), trained)
    early = tiny_qwen3(0)
    ll.load(early, tmp_path / "checkpoint-2" / "adapter.safetensors")
    assert not torch.equal(_logits(early, batch), trained), "checkpoint-2 should hold step-2 weights"


def test_save_total_limit_rotates_adapter_checkpoints(tmp_path):
    callback = AdapterCheckpointCallback()
    _train(tmp_path, callback, save_total_limit=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["checkpoint-4", "checkpoint-6"]
    assert [p.parent.name for p in callback.saved] == ["checkpoint-4", "checkpoint-6"]


def test_trainer_with_reentrant_gradient_checkpointing_trains(tmp_path):
    names = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    gc = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    model, att, start, trainer = _train(
        tmp_path, AdapterCheckpointCallback(), **{gc: True, f"{gc}_kwargs": {"use_reentrant": True}}
    )
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.95 * losses[0], losses
    assert all(not torch.equal(v.detach(), start[k]) for k, v in att.adapter_tensors().items())
