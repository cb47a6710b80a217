"""DDP and FSDP2 on CPU (gloo, 2 ranks on loopback): adapters stay in sync, match a
single-process run on the concatenated batch, leave the base alone and save/load exactly."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lora_lite as ll

from .support import dist_worker
from .support.models import tiny_qwen3

WORKER = Path(dist_worker.__file__)
WORLD = 2
TIMEOUT_S = 150

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no torch.distributed gloo backend",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, out: Path) -> None:
    """Start WORLD ranks of dist_worker.py the way torchrun would; fail with their output."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(WORLD), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), mode, str(out)], env={**env, "RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(WORLD)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    codes = [p.returncode for p in procs]
    assert codes == [0] * WORLD, f"{mode} ranks exited with {codes}:\n" + "\n---\n".join(logs)


def reference() -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """The same training in one process on the concatenated global batch."""
    model = dist_worker.attached_model()
    params = [p for p in model.parameters() if p.requires_grad]
    dist_worker.train(model, params, dist_worker.global_batch())
    tensors = {k: v.detach().clone() for att in ll.attachments(model) for k, v in att.adapter_tensors().items()}
    return tensors, model


@pytest.fixture(scope="module")
def single_process():
    return reference()


_RUNS: dict[str, Path] = {}


def launched(mode: str, tmp_path_factory) -> tuple[str, Path]:
    """Each mode's two ranks run once per session; every test reads their output."""
    if mode not in _RUNS:
        out = tmp_path_factory.mktemp(mode)
        launch(mode, out)
        _RUNS[mode] = out
    return mode, _RUNS[mode]


@pytest.fixture(params=["ddp", "fsdp"])
def run(request, tmp_path_factory):
    return launched(request.param, tmp_path_factory)


def test_adapters_identical_on_both_ranks_and_equal_single_process(run, single_process):
    mode, out = run
    ranks = [load_file(str(out / f"rank{r}.safetensors")) for r in range(WORLD)]
    ref, _ = single_process
    assert set(ranks[0]) == set(ranks[1]) == set(ref) and len(ref) == 2 * 14
    for key, value in ref.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{mode}: {key} differs between ranks"
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-5, atol=1e-6, msg=f"{mode}: {key}")
    init = dist_worker.attached_model()
    moved = [k for k, v in init.state_dict().items() if ".lora_" in k and not torch.equal(v, ranks[0][k])]
    assert len(moved) == len(ref), "every adapter tensor must have trained"


def test_base_weights_untouched(run):
    mode, out = run
    base = load_file(str(out / "base.safetensors"))
    fresh = tiny_qwen3(seed=0).state_dict()
    assert set(base) == set(fresh)
    for key, value in fresh.items():
        assert torch.equal(base[key], value), f"{mode}: base weight {key} changed"


def test_rank0_save_loads_into_fresh_model_exactly(run, single_process):
    mode, out = run
    trained = load_file(str(out / "rank0.safetensors"))
    model = tiny_qwen3(seed=0)
    ll.load(model, out / "adapter.safetensors")
    state = model.state_dict()
    for key, value in trained.items():
        assert torch.equal(state[key], value), f"{mode}: {key} did not load exactly"
    _, ref_model = single_process
    batch = dist_worker.global_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref_model(**batch).logits, rtol=1e-5, atol=1e-5)


def test_attaching_after_wrapping_is_refused(run):
    mode, out = run
    for r in range(WORLD):
        text = (out / f"attach_after_wrap_rank{r}.txt").read_text()
        assert ("DistributedDataParallel" if mode == "ddp" else "DTensor") in text
        assert "then" in text


def test_fsdp_loaded_then_sharded_model_matches_single_process(tmp_path_factory, single_process):
    _, out = launched("fsdp", tmp_path_factory)
    logits = load_file(str(out / "sharded_logits.safetensors"))["logits"]
    _, ref_model = single_process
    with torch.no_grad():
        torch.testing.assert_close(logits, ref_model(**dist_worker.global_batch()).logits, rtol=1e-5, atol=1e-5)


def test_fsdp_peft_export_of_sharded_model_loads_in_peft(tmp_path_factory, single_process):
    peft = pytest.importorskip("peft")
    _, out = launched("fsdp", tmp_path_factory)
    pm = peft.PeftModel.from_pretrained(tiny_qwen3(seed=0), str(out / "peft")).eval()
    _, ref_model = single_process
    batch = dist_worker.global_batch()
    with torch.no_grad():
        torch.testing.assert_close(pm(**batch).logits, ref_model(**batch).logits, rtol=1e-5, atol=1e-5)
