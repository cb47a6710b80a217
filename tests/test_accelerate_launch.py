"""`accelerate launch` with the HF Trainer over 2 CPU processes (gloo), end to end: both
ranks end with the same adapter, the adapter-only checkpoint rank 0 wrote reloads into a
fresh model exactly, and the base weights never trained."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_lite as ll

from .support.models import tiny_qwen3, token_batch

WORKER = Path(__file__).resolve().parent / "support" / "accelerate_worker.py"


def test_accelerate_launch_two_cpu_processes_trains_and_checkpoints(tmp_path):
    pytest.importorskip("accelerate")
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    # accelerate's `--cpu` runs ONE process; its multi-process launcher (`--multi_gpu`, i.e.
    # torch.distributed.run) with the Trainer's use_cpu=True runs DDP over gloo on CPUs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    cmd = [launcher, "launch", "--num_processes", "2", "--num_machines", "1", "--multi_gpu", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "29517", str(WORKER), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])

    rank0, rank1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert sorted(rank0) == sorted(rank1) and all(torch.equal(rank0[k], rank1[k]) for k in rank0), "ranks diverged"
    fresh_start = {k: v for k, v in ll.attach(tiny_qwen3(0), ll.LoraLiteConfig(variant="lora", r=4, alpha=8))
                   .adapter_tensors().items()}
    assert any(not torch.equal(rank0[k], fresh_start[k]) for k in rank0), "the adapter did not train"

    ckpt = tmp_path / "trainer" / "checkpoint-4" / "adapter.safetensors"
    assert ckpt.is_file(), sorted(p.name for p in (tmp_path / "trainer").iterdir())
    model = tiny_qwen3(0)
    (att,) = ll.load(model, ckpt)
    got = att.adapter_tensors(persistent_only=True)
    assert all(torch.equal(got[k], rank0[k]) for k in got), "the checkpoint differs from the trained adapter"
    base = tiny_qwen3(0)
    batch = token_batch(128)
    ll.attach(base, ll.LoraLiteConfig(variant="lora", r=4, alpha=8))
    with torch.no_grad():
        for k, v in ll.attachments(base)[0].adapter_tensors().items():
            v.copy_(rank0[k])
        torch.testing.assert_close(model(**batch).logits, base(**batch).logits, atol=0, rtol=0)
