"""transformers integration: base models, adapter-only Trainer checkpoints, gradient checkpointing.

Import this module only where transformers is installed (``pip install
lora-lite-core[probe]``); ``import lora_lite`` never imports it.

    from lora_lite.hf import AdapterCheckpointCallback  # = lora_lite.integrations.hf
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[AdapterCheckpointCallback()])

The callback writes ``<output_dir>/checkpoint-<step>/adapter.safetensors`` (a
``lora_lite.save`` file, kilobytes to megabytes) on the Trainer's own save schedule and
stops the Trainer from writing full-model checkpoints. It also makes gradient
checkpointing safe with a frozen base: see :func:`enable_gradient_checkpointing`.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import save
from ..errors import MissingDependencyError, ModelLoadError
from ..runtime import attachments
from ..runtime import step as lora_step

try:
    import transformers
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - exercised only without transformers
    raise MissingDependencyError(
        "lora_lite.hf needs transformers; install it with `pip install 'lora-lite-core[probe]'` "
        "(or `pip install transformers`)."
    ) from err

EMBEDDED_MODEL = "embedded:qwen3-tiny"
_EMBEDDED_CONFIG = "qwen3-tiny.json"
CHECKPOINT_PREFIX = "checkpoint-"
ADAPTER_FILENAME = "adapter.safetensors"


def embedded_config() -> transformers.PretrainedConfig:
    """The Qwen3-architecture config shipped with lora-lite-core (0.6B-shaped, tiny).

    Same layout and width ratios as Qwen3-0.6B (q_proj widens 2x, k/v_proj keep the
    width with grouped-query heads, MLP 3x, tied embeddings, q/k norms), shrunk to
    hidden 128, 4 layers and a 4096-token vocabulary so a probe runs in seconds on a CPU.
    """
    text = resources.files("lora_lite").joinpath("data", _EMBEDDED_CONFIG).read_text()
    return transformers.AutoConfig.for_model(**json.loads(text))


def embedded_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM of :func:`embedded_config` with random weights drawn from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(embedded_config(), dtype=dtype)
    return model


def _looks_like_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.sep + os.sep in name


def load_causal_lm(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """The embedded model (``name == EMBEDDED_MODEL``), a local directory or a hub id.

    A hub id is looked up in the local cache first; only if it is missing there is the
    hub contacted. Every failure raises :class:`ModelLoadError` saying what to do.
    """
    if name == EMBEDDED_MODEL:
        return embedded_model(seed, dtype)
    path = Path(name).expanduser()
    if path.exists() or _looks_like_path(name):
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{name} is not a model directory (no config.json there). Pass a directory written by "
                "model.save_pretrained(...), a Hugging Face hub id, or omit --model for the embedded model."
            )
        return _from_pretrained(str(path), dtype, local_files_only=True)
    try:
        return _from_pretrained(name, dtype, local_files_only=True)
    except ModelLoadError as cached_err:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise ModelLoadError(
                f"{name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so it cannot be "
                "downloaded. Download it where the hub is reachable (`huggingface-cli download "
                f"{name}`), pass a local directory, or omit --model for the embedded model."
            ) from cached_err
    try:
        return _from_pretrained(name, dtype, local_files_only=False)
    except ModelLoadError as err:
        raise ModelLoadError(
            f"{name!r} is neither cached locally nor downloadable (hub unreachable, offline, or no such repo): "
            f"{err.__cause__}. Pass a local directory written by save_pretrained, or omit --model for the "
            "embedded model. Set HF_HUB_OFFLINE=1 to fail fast instead of retrying the hub."
        ) from None


def _from_pretrained(name: str, dtype: torch.dtype, local_files_only: bool) -> nn.Module:
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local_files_only)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"could not load {name!r}: {err}") from err


def enable_gradient_checkpointing(model: nn.Module, use_reentrant: bool = False) -> None:
    """Turn on transformers' gradient checkpointing in a way that trains hook adapters.

    The trap: with *reentrant* checkpointing, a block whose inputs do not require grad
    runs its forward under ``no_grad``. With the whole base frozen, the embeddings'
    output does not require grad, so the adapters inside every checkpointed block get no
    gradient and ``loss.backward()`` fails with "element 0 of tensors does not require
    grad and does not have a grad_fn". Making the input embeddings' output require grad
    (``model.enable_input_require_grads()``) fixes it at the cost of one tiny tensor;
    non-reentrant checkpointing (the default here) does not need it, and it is applied
    anyway so both modes behave the same.
    """
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise TypeError(f"{type(model).__name__} has no gradient checkpointing support (not a transformers model?).")
    model.enable_input_require_grads()


def _is_checkpointing(model: nn.Module) -> bool:
    # transformers 5 renamed gradient to activation checkpointing; 4.x has only the old name
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr):
            return bool(getattr(model, attr))
    return False


class AdapterCheckpointCallback(TrainerCallback):
    """Save only the adapter tensors whenever the Trainer would save a checkpoint.

    On each save the Trainer's schedule asks for (``save_strategy``/``save_steps``), it
    writes ``<output_dir>/checkpoint-<global_step>/adapter.safetensors`` with
    ``lora_lite.save`` plus the ``trainer_state.json`` and, unless
    ``full_checkpoints=True``, cancels the Trainer's full-model checkpoint. With
    ``save_total_limit`` set, older adapter checkpoints are deleted. Load one with
    ``lora_lite.load(fresh_base_model, path)``.

    When training starts with gradient checkpointing on, it makes the input embeddings'
    output require grad (see :func:`enable_gradient_checkpointing`). After every optimizer
    step it calls :func:`lora_lite.step` (variants with a schedule, e.g. AdaLoRA). A
    variant's ``lora_lite.regularization_loss`` term is not added by a callback (callbacks
    cannot change the loss): override ``Trainer.compute_loss`` to add it.
    """

    def __init__(self, filename: str = ADAPTER_FILENAME, full_checkpoints: bool = False) -> None:
        self.filename = filename
        self.full_checkpoints = full_checkpoints
        self.saved: list[Path] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and _is_checkpointing(model):
            model.enable_input_require_grads()

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # after optimizer.step(), before zero_grad(): where lora_lite.step must run
        if model is not None and attachments(model):
            lora_step(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        return self._maybe_save(args, state, control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        return self._maybe_save(args, state, control, model)

    def _maybe_save(self, args, state, control, model) -> Any:
        if not control.should_save or model is None:
            return control
        if not attachments(model):
            return control  # nothing attached: leave the Trainer's own checkpointing alone
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
            path = save(model, folder / self.filename)
            state.save_to_json(str(folder / "trainer_state.json"))
            if path not in self.saved:
                self.saved.append(path)
            self._rotate(args.save_total_limit)
        if not self.full_checkpoints:
            control.should_save = False
        return control

    def _rotate(self, limit: int | None) -> None:
        if not limit or len(self.saved) <= limit:
            return
        for old in self.saved[:-limit]:
            shutil.rmtree(old.parent, ignore_errors=True)
        self.saved = self.saved[-limit:]


__all__ = [
    "ADAPTER_FILENAME", "AdapterCheckpointCallback", "CHECKPOINT_PREFIX", "EMBEDDED_MODEL", "embedded_config",
    "embedded_model", "enable_gradient_checkpointing", "load_causal_lm",
]
