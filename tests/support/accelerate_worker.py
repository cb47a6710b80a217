"""One rank of an `accelerate launch --num_processes 2 --cpu` run: the HF Trainer trains a
lora-lite adapter under DDP (gloo) with adapter-only checkpoints. Each rank then writes
its final adapter tensors to OUT/rank<N>.safetensors so the test can check that the ranks
agree and that the checkpoint reloads exactly.

Usage: ``accelerate launch --num_processes 2 --multi_gpu tests/support/accelerate_worker.py OUT``
(on CPUs: the multi-process launcher with the Trainer's ``use_cpu=True``, gloo).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lora_lite as ll  # noqa: E402
from lora_lite.integrations.hf import AdapterCheckpointCallback  # noqa: E402
from tests.support.models import tiny_qwen3, token_batch  # noqa: E402


def dataset(n: int = 16, seq: int = 8) -> list[dict[str, torch.Tensor]]:
    ids = token_batch(128, batch=n, seq=seq, seed=3)["input_ids"]
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]


def main(out: Path) -> None:
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = tiny_qwen3(0)
    att = ll.attach(model, ll.LoraLiteConfig(variant="lora", r=4, alpha=8))
    args = transformers.TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=4, per_device_train_batch_size=4, learning_rate=2e-2,
        save_strategy="steps", save_steps=4, logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True,
        seed=0, ddp_backend="gloo", ddp_find_unused_parameters=False,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(),
                                   callbacks=[AdapterCheckpointCallback()])
    trainer.train()
    rank = trainer.args.process_index
    assert trainer.args.world_size == 2, f"expected 2 processes, got {trainer.args.world_size}"
    tensors = {k: v.detach().contiguous().clone() for k, v in att.adapter_tensors().items()}
    save_file(tensors, str(out / f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
