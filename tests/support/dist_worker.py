"""One rank of the distributed tests (not collected by pytest; ``test_dist_*`` launches it).

It follows torchrun's contract (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the
environment), so ``torchrun --nproc-per-node 2 tests/support/dist_worker.py ddp OUT`` runs it too.
Usage: ``dist_worker.py {ddp|fsdp} OUT_DIR``. Every rank trains a LoRA adapter on its half
of a fixed global batch, then writes what the test checks under OUT_DIR:
``rank{R}.safetensors`` (full adapter tensors as this rank sees them), ``adapter.safetensors``
(``lora_lite.save``), ``base.safetensors`` (base weights after training, rank 0),
``attach_after_wrap_rank{R}.txt`` (the error attaching to the wrapped model) and, for fsdp,
``peft/`` (``lora_lite.export_peft`` of the sharded model) and ``sharded_logits.safetensors``
(a fresh model that loaded the file, then was sharded).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora_lite as ll  # noqa: E402
from models import tiny_qwen3, token_batch  # noqa: E402

STEPS = 3
LR = 0.5
GLOBAL_BATCH = 4
CFG = {"variant": "lora", "r": 4, "alpha": 8.0}


def global_batch() -> dict[str, torch.Tensor]:
    return token_batch(batch=GLOBAL_BATCH, seq=8, seed=3)


def attached_model() -> torch.nn.Module:
    model = tiny_qwen3(seed=0)
    torch.manual_seed(1)  # lora_A's kaiming init: the same on every rank and in the reference
    ll.attach(model, ll.LoraLiteConfig(**CFG))
    return model


def train(model_for_forward, params, batch, steps=STEPS) -> None:
    """Plain SGD on causal-LM loss; each rank's loss is the mean over its equal token count,
    so the gradient average across ranks equals the gradient on the concatenated batch."""
    opt = torch.optim.SGD(params, lr=LR)
    for _ in range(steps):
        opt.zero_grad()
        model_for_forward(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()


def full(t: torch.Tensor) -> torch.Tensor:
    gather = getattr(t, "full_tensor", None)
    return (gather() if callable(gather) else t).detach().cpu().contiguous()


def main(mode: str, out: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    per_rank = GLOBAL_BATCH // world
    batch = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in global_batch().items()}

    model = attached_model()
    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        train(wrapped, [p for p in wrapped.parameters() if p.requires_grad], batch)
    elif mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        train(model, [p for p in model.parameters() if p.requires_grad], batch)
    else:
        raise SystemExit(f"unknown mode {mode!r}")

    adapter = {k: full(v) for att in ll.attachments(model) for k, v in att.adapter_tensors().items()}
    save_file(adapter, str(out / f"rank{rank}.safetensors"))
    base = {k: full(v) for k, v in model.state_dict().items() if ".lora_" not in k}
    try:
        ll.attach(wrapped if mode == "ddp" else model,
                  ll.LoraLiteConfig(variant="lora", r=2, target_names=("lm_head",), exclude_names=()))
    except ll.AttachError as err:
        (out / f"attach_after_wrap_rank{rank}.txt").write_text(str(err))
    if mode == "ddp":
        if rank == 0:
            ll.save(model, out / "adapter.safetensors")
    else:
        ll.save(model, out / "adapter.safetensors")  # a collective on a sharded model
        ll.export_peft(model, out / "peft")  # likewise
        fresh = tiny_qwen3(seed=0)
        ll.load(fresh, out / "adapter.safetensors")
        for layer in fresh.model.layers:
            fully_shard(layer)
        fully_shard(fresh)
        with torch.no_grad():
            logits = full(fresh(**global_batch()).logits)
        if rank == 0:
            save_file({"logits": logits}, str(out / "sharded_logits.safetensors"))
    if rank == 0:
        save_file(base, str(out / "base.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
