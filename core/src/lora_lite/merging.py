"""merge / unmerge / merge_and_unload: fold the adapters into the base weights, and back.

``merge(model)`` asks each attachment's variant, through its ``merge`` hook, for the
dense weight and bias that compute what its hooks compute, writes them into the target
layers through their layer kind (``weights.py``: plain, Conv1D's transposed storage,
bitsandbytes), and removes the hooks: the model then runs at the base model's speed and
changing a ``lora_*`` tensor no longer changes its output. The adapter tensors stay.
``unmerge(model)`` puts back, bit for bit, the storage that was there before (each write
returns its exact undo) and re-registers the hooks, so training can go on.
``merge_and_unload(model)`` makes the merge permanent and removes every trace of
lora-lite. Core computes nothing variant-specific here.

Defined behaviour: merging a merged model or unmerging an unmerged one raises
:class:`MergeError`; attaching or loading onto a merged model too; ``save`` while merged
writes the adapter as it is (the base fingerprint was taken before the merge); ``detach``
while merged unmerges first, so the base comes back exactly. Quantized storage (bnb 4/8-bit)
is refused unless ``dequantize=True`` (the layer is swapped for a dense ``nn.Linear``
holding the merged weight: exact) or ``requantize=True`` (the merged weight is quantized
into the layer's own format; the error that introduced is measured and returned).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import ConfigError, MergeError
from .runtime import Attachment, _register_hooks, _remove_hooks, _restore_requires_grad, _state, _undo, _STATE_ATTR
from .weights import dense_weight, layer_kind

_MERGE_UNDO = "_lora_lite_merge_undo"  # on each merged layer: undo functions, in write order

Undo = Callable[[], None]


def _check_untied(model: nn.Module, atts: list[Attachment]) -> None:
    """A weight shared by several modules (tied input/output embeddings) cannot take one
    module's merge: the others would change too."""
    holders: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        for p in m._parameters.values():
            if p is not None:
                holders.setdefault(id(p), []).append(name)
    for att in atts:
        for t, host in zip(att.targets, att.hosts):
            shared = holders.get(id(getattr(host, "weight", None)), [])
            if len(shared) > 1:
                raise MergeError(
                    f"{t.name}'s weight is shared with {[n for n in shared if n != t.name]} (tied weights): merging "
                    "its adapter would change them too. Keep it hooked, or untie the weights first (e.g. "
                    "model.lm_head.weight = nn.Parameter(model.lm_head.weight.clone()))."
                )


def _check_mergeable(atts: list[Attachment], dequantize: bool, requantize: bool) -> None:
    no_hook = sorted({a.variant.name for a in atts if not a.variant.mergeable})
    if no_hook:
        raise MergeError(
            f"variant(s) {no_hook} have no merge hook, so their adapters cannot be folded into the weights; "
            "run them through the hooks, or detach them before merging the others."
        )
    if dequantize and requantize:
        raise ConfigError("merge takes dequantize=True or requantize=True, not both.")
    hosts = [id(h) for a in atts for h in a.hosts]
    if dequantize and len(hosts) != len(set(hosts)):
        raise MergeError("dequantize=True swaps each quantized layer for a dense one, which stacked attachments "
                         "cannot share; merge with one attachment per layer active (lora_lite.set_active).")
    for att in atts:
        for t in att.targets:
            kind = layer_kind(t.layer)  # the host's kind (a slot reads through to it)
            if kind is None or (kind.write is None and not (kind.quantized and dequantize)):
                raise MergeError(
                    f"{t.name} ({type(t.layer).__name__}) has a storage lora-lite cannot write a merged weight into; "
                    "keep it hooked (do not merge), or register a LayerKind with a write function."
                )
            if kind.quantized and not (dequantize or requantize):
                raise MergeError(
                    f"{t.name} is a quantized {kind.name} layer: merging into it means requantizing the merged "
                    "weight, which loses precision. Pass dequantize=True (swap in a dense nn.Linear holding the "
                    "merged weight: exact) or requantize=True (store it quantized; the error is measured and returned)."
                )


def _merged(
    att: Attachment, layer: nn.Module, name: str, copy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The variant's merged (weight, bias) for one target, in float32, checked. ``copy``:
    the hook gets copies (a hook that writes into its arguments cannot touch the weights
    unmerge puts back); merge_and_unload, which puts nothing back, skips them."""
    weight = dense_weight(layer).detach().to(torch.float32, copy=copy)
    bias = getattr(layer, "bias", None)
    bias = None if bias is None else bias.detach().to(torch.float32, copy=copy)
    with torch.no_grad():
        got = att.variant.hook("merge")(layer, weight, bias)
    if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], torch.Tensor)
            and got[0].shape == weight.shape and (got[1] is None) == (bias is None)
            and (got[1] is None or got[1].shape == bias.shape)):
        raise MergeError(
            f"variant {att.variant.name!r}: merge on {name} must return (weight {tuple(weight.shape)}, bias "
            f"{None if bias is None else tuple(bias.shape)}), got {type(got).__name__}."
        )
    return got


def _swap_bias(layer: nn.Module, bias: torch.Tensor) -> Undo:
    old = layer.bias.data
    layer.bias.data = bias.to(dtype=old.dtype, device=old.device)
    return lambda: setattr(layer.bias, "data", old)


def _dense_replacement(model: nn.Module, name: str, layer: nn.Module, weight, bias) -> Undo:
    """Swap ``layer`` for an ``nn.Linear`` holding the merged weight; the undo swaps it back."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    dtype = getattr(layer, "compute_dtype", None) or (torch.float32 if bias is None else layer.bias.dtype)
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    dense.requires_grad_(False)
    dense.train(layer.training)
    setattr(parent, child, dense)
    return lambda: setattr(parent, child, layer)


def merge(model: nn.Module, *, dequantize: bool = False, requantize: bool = False) -> dict[str, float]:
    """Fold every attachment into the base weights; the hooks stop acting, the tensors stay.

    :returns: ``{target: error}`` for layers written with ``requantize=True``: the max abs
        difference between the stored (requantized) and the exact merged weight, relative
        to the merged weight's max abs value. Empty otherwise.
    """
    return _merge(model, dequantize, requantize, unload=False)


def _merge(model: nn.Module, dequantize: bool, requantize: bool, unload: bool) -> dict[str, float]:
    """``merge``; with ``unload`` (merge_and_unload) without what only unmerge and a save
    while merged need: the base fingerprint and the defensive copies of the weights."""
    state = _state(model)
    if state.merged:
        raise MergeError("the model's adapters are already merged; lora_lite.unmerge(model) first to merge again.")
    active = [a for a in state.attachments if a.active]
    _check_mergeable(active, dequantize, requantize)
    _check_untied(model, active)
    for att in active if not unload else ():
        att.fingerprint  # noqa: B018  (taken now, from the weights as they were: save while merged stays valid)
    errors: dict[str, float] = {}
    done: list[nn.Module] = []
    try:
        for att in active:  # in attach order: a stacked attachment merges onto the ones below it
            for t, host in zip(att.targets, att.hosts):
                weight, bias = _merged(att, t.layer, t.name, copy=not unload)
                kind = layer_kind(host)
                undos = t.layer.__dict__.setdefault(_MERGE_UNDO, [])
                done.append(t.layer)
                if kind.quantized and dequantize:
                    undos.append(_dense_replacement(model, t.name, host, weight, bias))
                    continue
                undos.append(kind.write(host, weight))
                if kind.quantized:
                    stored = dense_weight(host).float()
                    errors[t.name] = float((stored - weight).abs().max() / weight.abs().max().clamp_min(1e-30))
                if bias is not None:
                    undos.append(_swap_bias(host, bias))
    except BaseException:
        _run_undos(done)
        raise
    for att in active:
        _remove_hooks(att)
    state.merged = True
    if errors:
        warnings.warn(
            f"merge requantized {len(errors)} layer(s); max relative error {max(errors.values()):.3g} "
            "(the returned dict has it per layer).", stacklevel=2,
        )
    return errors


def _run_undos(layers: list[nn.Module]) -> None:
    for layer in reversed(layers):
        for undo in reversed(layer.__dict__.pop(_MERGE_UNDO, [])):
            undo()


def unmerge(model: nn.Module) -> None:
    """Put back the weights from before :func:`merge` bit for bit and re-enable the hooks."""
    state = _state(model)
    if not state.merged:
        raise MergeError("the model's adapters are not merged; there is nothing to unmerge.")
    _run_undos([t.layer for att in state.attachments for t in att.targets])
    for att in state.attachments:
        if att.active:
            _register_hooks(att)
    state.merged = False


def merge_and_unload(model: nn.Module, *, dequantize: bool = False, requantize: bool = False) -> nn.Module:
    """Merge (if not merged yet) and remove every trace of lora-lite: no hooks, no ``lora_*``
    tensors or attributes, no bookkeeping; ``requires_grad`` flags as before the first
    attach. Returns ``model``, now a plain model with the adapted weights."""
    state = _state(model)
    if not state.merged:
        _merge(model, dequantize, requantize, unload=True)
    for att in state.attachments:
        _undo(att, restore_weights=False)  # also drops the merge undos and a rewritten weight's record
    _restore_requires_grad(model, state.requires_grad)
    del model.__dict__[_STATE_ATTR]
    return model


def save_merged(model: nn.Module, path: str | os.PathLike, *, dequantize: bool = False,
                requantize: bool = False) -> Path:
    """Write the model with its adapters merged, for tools that know nothing of lora-lite.

    A transformers model (one with ``save_pretrained``) becomes a ``save_pretrained``
    directory that ``AutoModelForCausalLM.from_pretrained`` loads as it is; any other
    module a safetensors file of its merged ``state_dict``. Either way without a single
    adapter tensor. The model itself is left as it was (merged or not).
    """
    state = _state(model)
    was_merged = state.merged
    if not was_merged:
        merge(model, dequantize=dequantize, requantize=requantize)
    try:
        adapter = {id(t) for a in state.attachments for t in a.adapter_tensors().values()}
        clean = {k: v for k, v in model.state_dict(keep_vars=True).items() if id(v) not in adapter and ".lora_" not in k}
        clean = {k: v.detach() for k, v in clean.items()}
        path = Path(path)
        if callable(getattr(model, "save_pretrained", None)):
            model.save_pretrained(str(path), state_dict=clean)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in clean.items()}, str(path), metadata={"format": "pt"})
    finally:
        if not was_merged:
            unmerge(model)
    return path


def _cli_merge(args) -> int:
    from .checkpoint import load
    from .integrations.hf import load_causal_lm

    model = load_causal_lm(args.model)
    load(model, args.adapter)
    out = save_merged(model, args.output, dequantize=args.dequantize)
    print(f"wrote merged model {out} (loads with transformers alone: AutoModelForCausalLM.from_pretrained)")
    return 0


def add_cli_commands(subparsers) -> None:
    """``lora-lite merge ADAPTER OUT --model ID_OR_PATH``."""
    p = subparsers.add_parser("merge", help="merge a lora-lite adapter into its base model and save_pretrained it")
    p.add_argument("adapter", help="lora-lite .safetensors checkpoint")
    p.add_argument("output", help="directory to write the merged model into")
    p.add_argument("--model", required=True, help="base model (transformers hub id or local path) the adapter belongs to")
    p.add_argument("--dequantize", action="store_true", help="merge quantized (bnb) layers into dense copies")
    p.set_defaults(func=_cli_merge)


__all__ = ["add_cli_commands", "merge", "merge_and_unload", "save_merged", "unmerge"]
