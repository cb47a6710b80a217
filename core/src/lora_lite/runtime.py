"""attach / detach: adapter tensors, hooks, freezing, rollback and exact restore.

Several attachments may live on one model as long as their targets are disjoint (IA3
on attention plus IA3-FF on the MLP, say). The model keeps its bookkeeping in
``model.__dict__["_lora_lite"]``: the live attachments and every base parameter's
``requires_grad`` from before the first attach, restored when the last one detaches.
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import LoraLiteConfig
from .errors import (
    AlreadyAttachedError,
    AttachError,
    CalibrationError,
    ConfigError,
    ForwardError,
    LoraLiteError,
    MergeError,
    NotAttachedError,
    PluginError,
    TargetingError,
    add_context,
)
from .params import ParamSpec
from .plugins import VariantInfo, get_variant
from .targeting import Target, find_targets
from .weights import _HOST_ATTR, _UNDO_ATTR, LINEAR_LIKE, base_fingerprint, kind_name, layer_kind, restore_dense_weight

_STATE_ATTR = "_lora_lite"
_OWNED_PREFIXES = ("lora_", "_lora_lite")

DEFAULT_NAME = "default"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


_MERGED_ATTR = "lora_merged_forward"
# layer kinds whose forward is F.linear(x, W, b) on the (d_out, d_in) weight their ``read`` gives
_MERGED_KINDS = ("linear", "conv1d")


def _slot_name(name: str) -> str:
    return f"lora_{name}"


@dataclass
class Attachment:
    """One ``attach`` call: the handle it returns. ``detach()`` removes just this one."""

    model: nn.Module
    cfg: LoraLiteConfig
    variant: VariantInfo
    targets: list[Target]
    specs: dict[str, dict[str, ParamSpec]]
    name: str = DEFAULT_NAME
    hook_handles: list[Any] = field(default_factory=list)
    live: bool = True
    active: bool = True
    # the layers the hooks sit on; ``targets[i].layer`` is where this attachment's tensors
    # live: the layer itself, or an adapter slot on it when another attachment got there first
    hosts: list[nn.Module] = field(default_factory=list)
    _fingerprint: dict[str, list[float]] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.targets)

    def __iter__(self):
        return iter(self.targets)

    @property
    def fingerprint(self) -> dict[str, list[float]]:
        """``{target: [sum, sum of squares]}`` of each base weight (float64), for checkpoints.

        Computed on first use (the first ``save`` or ``load``), not at attach: reading
        every target weight in float64 was most of attach's time. The base is frozen, so
        the first value stands; a weight an ``init`` rewrote is fingerprinted as it was
        before (see ``replace_dense_weight``).
        """
        if self._fingerprint is None:
            self._fingerprint = {t.name: base_fingerprint(t.layer) for t in self.targets}
        return self._fingerprint

    @property
    def target_names(self) -> list[str]:
        return [t.name for t in self.targets]

    def adapter_tensors(self, persistent_only: bool = False) -> dict[str, torch.Tensor]:
        """``{full.path.lora_x: tensor}`` for this attachment (its ``model.state_dict()`` keys)."""
        out = {}
        for t, host in zip(self.targets, self.hosts):
            prefix = t.name if t.layer is host else f"{t.name}.{_slot_name(self.name)}"
            for pname, spec in self.specs[t.name].items():
                if spec.persistent or not persistent_only:
                    out[f"{prefix}.{pname}"] = getattr(t.layer, pname)
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.adapter_tensors().values() if p.requires_grad]

    def detach(self) -> None:
        """Remove this attachment's hooks and tensors, undo weight changes."""
        if not self.live:
            raise NotAttachedError(
                "this attachment was already detached; lora_lite.attachments(model) lists the live ones."
            )
        state = _state(self.model)
        _check_detach_order(self, state)
        if state.merged:  # put the weights back as they were before merge, then remove this one
            from .merging import unmerge

            unmerge(self.model)
        _undo(self)
        state.attachments.remove(self)
        if not state.attachments:
            _restore_requires_grad(self.model, state.requires_grad)
            del self.model.__dict__[_STATE_ATTR]

    def __repr__(self) -> str:
        return (f"Attachment(name={self.name!r}, variant={self.cfg.variant!r}, targets={len(self.targets)}, "
                f"active={self.active}, live={self.live})")


class AdapterSlot(nn.Module):
    """Holds the tensors of an attachment stacked on a layer that already carries one.

    A child module of that layer (``q_proj.lora_<name>.lora_A`` in ``state_dict``), handed
    to the variant's hooks in place of the layer: its own ``lora_*`` tensors are found
    first, anything else (``weight``, ``bias``, ``in_features``) is read from the layer, and
    ``lora_lite.dense_weight`` and friends act on the layer's storage. So a variant written
    for one adapter per layer stacks unchanged, and the first attachment on a layer keeps
    its tensors (and keys) on the layer itself, as without stacking.
    """

    def __init__(self, host: nn.Module) -> None:
        super().__init__()
        self.__dict__[_HOST_ATTR] = host  # a plain reference: not a submodule (no cycle)
        self.training = host.training  # then model.train() / .eval() reach it as the layer's child

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith(_OWNED_PREFIXES):  # the host's adapter tensors are another attachment's
                raise
            return getattr(self.__dict__[_HOST_ATTR], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - never called
        raise ForwardError("an adapter slot holds tensors; it is not a layer to call.")


@dataclass
class _ModelState:
    attachments: list[Attachment]
    requires_grad: dict[str, bool]
    merged: bool = False  # see merging.py


def _check_detach_order(att: Attachment, state: _ModelState) -> None:
    """An attachment whose init rewrote a layer's weight cannot go while a later one sits on
    that layer: the later one was initialised on the rewritten weight (and may have rewritten
    it again), so no order-free undo restores "the model with only the others attached"."""
    later = state.attachments[state.attachments.index(att) + 1:]
    for t, host in zip(att.targets, att.hosts):
        if _UNDO_ATTR not in t.layer.__dict__:
            continue
        above = [a.name for a in later if any(h is host for h in a.hosts)]
        if above:
            raise AttachError(
                f"attachment {att.name!r} rewrote the weight of {t.name}, and {above} were attached on top of it "
                f"(initialised on the rewritten weight): detach {above} first, then {att.name!r}."
            )


def _state(model: nn.Module) -> _ModelState:
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        raise NotAttachedError(
            f"{type(model).__name__} carries no lora-lite adapter; call lora_lite.attach(model, cfg) "
            "(or lora_lite.load(model, path)) first."
        )
    return state


def attachments(model: nn.Module) -> list[Attachment]:
    """The live attachments on ``model`` (empty list if none)."""
    state = model.__dict__.get(_STATE_ATTR)
    return list(state.attachments) if state else []


def _bad_call(name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
    where = f"{name} ({type(module).__name__})"
    if not args:
        raise ForwardError(
            f"{where} was called without a positional input tensor (keyword arguments: {sorted(kwargs)}); "
            "a lora-lite adapter reads the layer's input as its one positional argument. Call it as layer(x)."
        )
    if not isinstance(args[0], torch.Tensor):
        raise ForwardError(
            f"{where} was called with a {type(args[0]).__name__} as its input, not a torch.Tensor. "
            "Call it as layer(x) with a tensor x."
        )
    raise ForwardError(
        f"{where} was called with extra arguments ({len(args) - 1} more positional, keyword arguments "
        f"{sorted(kwargs)}); a lora-lite adapter computes from the input tensor alone and would silently "
        "ignore them. Call it as layer(x), or keep this layer out of the targets (exclude_names)."
    )


# The hooks take kwargs so that a call the adapter cannot represent (no tensor, extra
# arguments) fails loudly instead of being half-adapted; the check is three cheap tests.
def _make_post_hook(fwd, name: str, holder: nn.Module | None = None):
    if holder is None:  # the tensors live on the layer: the common case, one closure lookup less
        def hook(module, args, kwargs, output):
            if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
                _bad_call(name, module, args, kwargs)
            return fwd(module, args[0], output)
    else:
        def hook(module, args, kwargs, output):
            if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
                _bad_call(name, module, args, kwargs)
            return fwd(holder, args[0], output)

    return hook


def _make_pre_hook(fwd_in, name: str, holder: nn.Module | None = None):
    if holder is None:
        def hook(module, args, kwargs):
            if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
                _bad_call(name, module, args, kwargs)
            return (fwd_in(module, args[0]),), kwargs
    else:
        def hook(module, args, kwargs):
            if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
                _bad_call(name, module, args, kwargs)
            return (fwd_in(holder, args[0]),), kwargs

    return hook


def _non_finite(item: Any, where: str) -> str | None:
    """Where in ``item`` (nested mappings/sequences) a floating tensor holds NaN or inf."""
    if isinstance(item, torch.Tensor):
        return where if item.is_floating_point() and not bool(torch.isfinite(item).all()) else None
    if isinstance(item, Mapping):
        children = ((f"{where}[{k!r}]", v) for k, v in item.items())
    elif isinstance(item, (list, tuple)):
        children = ((f"{where}[{i}]", v) for i, v in enumerate(item))
    else:
        return None
    for child_where, child in children:
        found = _non_finite(child, child_where)
        if found:
            return found
    return None


def _raise_non_finite(where: str) -> None:
    raise CalibrationError(
        f"{where} holds NaN or inf values; statistics calibrated on it would be non-finite. "
        "Drop or clean those batches (e.g. torch.nan_to_num) and attach again."
    )


class _CheckedBatches:
    """A stream (generator, DataLoader) checked batch by batch as ``group_init`` reads it:
    checking it up front would consume a generator or read a DataLoader twice."""

    def __init__(self, data: Iterable[Any]) -> None:
        self.data = data

    def __iter__(self):
        for i, batch in enumerate(self.data):
            bad = _non_finite(batch, f"calibration_data batch {i}")
            if bad:
                _raise_non_finite(bad)
            yield batch

    def __len__(self) -> int:
        return len(self.data)


def _checked_calibration(data: Any) -> Any:
    """Reject empty or non-finite calibration data before ``group_init`` sees it.

    In-memory data (a tensor, mapping, list or tuple) is checked whole, now, and passed
    on unchanged; any other iterable is wrapped to be checked as it is read. A failure
    inside ``group_init`` rolls the attach back, so the model is untouched either way.
    """
    if isinstance(data, (torch.Tensor, Mapping, list, tuple)):
        if (data.numel() if isinstance(data, torch.Tensor) else len(data)) == 0:
            raise CalibrationError(
                f"calibration_data is an empty {type(data).__name__}; pass at least one batch of model inputs."
            )
        bad = _non_finite(data, "calibration_data")
        if bad:
            _raise_non_finite(bad)
        return data
    if not isinstance(data, Iterable):
        raise CalibrationError(
            f"calibration_data must be an iterable of model inputs (a list of batches, a DataLoader), "
            f"got {type(data).__name__}."
        )
    return _CheckedBatches(data)


def _collect_specs(variant: VariantInfo, targets: list[Target], cfg: LoraLiteConfig,
                   carried: set[int] = frozenset()) -> dict[str, dict[str, ParamSpec]]:
    param_specs = variant.hook("param_specs")
    specs = {}
    for t in targets:
        where = f"{variant.name}: param_specs of {t.name} ({t.d_in} -> {t.d_out})"
        try:
            got = param_specs(t.d_in, t.d_out, cfg, t)
        except LoraLiteError as err:
            raise add_context(err, where)
        except Exception as err:
            raise AttachError(f"{where} raised {type(err).__name__}: {err}. Nothing was attached.") from err
        if not isinstance(got, dict) or not all(isinstance(s, ParamSpec) for s in got.values()):
            raise PluginError(f"{where} must return dict[str, ParamSpec], got {got!r}.")
        for pname in got:
            if not pname.startswith("lora_") or not pname.isidentifier():
                raise PluginError(f"{where}: adapter tensor name {pname!r} must start with 'lora_'.")
            if id(t.layer) not in carried and hasattr(t.layer, pname):  # a slot starts empty
                raise AlreadyAttachedError(f"{t.name} already has an attribute {pname!r}; detach the previous adapter first.")
        specs[t.name] = got
    return specs


@dataclass
class _Plan:
    """What ``attach`` checked before touching the model: the first stage's result."""

    model: nn.Module
    cfg: LoraLiteConfig
    variant: VariantInfo
    targets: list[Target]
    specs: dict[str, dict[str, ParamSpec]]
    params: list[tuple[str, nn.Parameter]]
    existing: _ModelState | None
    calibration_data: Any
    name: str


def _carried(existing: _ModelState | None) -> set[int]:
    return {id(h) for a in (existing.attachments if existing else []) for h in a.hosts}


def _choose_name(existing: _ModelState | None, targets: list[Target], name: str | None) -> str:
    """The attachment's name: ``name`` if free and valid; if omitted, ``"default"`` (or
    ``"default_2"``, ...) for targets no other attachment is on. Stacking onto layers that
    already carry an adapter takes an explicit name, so a repeated attach is an error,
    not a silent second adapter."""
    taken = [a.name for a in existing.attachments] if existing else []
    if name is None:
        carried = _carried(existing)
        clash = [t.name for t in targets if id(t.layer) in carried]
        if clash:
            raise AlreadyAttachedError(
                f"{len(clash)} target(s) already carry an adapter (first: {clash[0]}). To stack another adapter on "
                "them, name it: lora_lite.attach(model, cfg, name='...'); to replace it, lora_lite.detach(model) "
                "first; or narrow target_names/target_roles/layers so the attachments are disjoint."
            )
        return next(n for n in (DEFAULT_NAME, *(f"{DEFAULT_NAME}_{i}" for i in range(2, len(taken) + 3)))
                    if n not in taken)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"attachment name {name!r} must be an identifier (letters, digits, _; not starting with a digit).")
    if name in taken:
        raise AlreadyAttachedError(
            f"the model already has an attachment named {name!r} (attachments: {taken}); pick another name, or "
            f"detach it first (lora_lite.attachments(model) lists them)."
        )
    slot = _slot_name(name)
    clash = [t.name for t in targets if slot in t.layer._modules or hasattr(t.layer, slot)]
    if clash:
        raise AlreadyAttachedError(f"{clash[0]} already has an attribute {slot!r}; pick another attachment name.")
    return name


def _plan(model: nn.Module, cfg: LoraLiteConfig, calibration_data: Any, name: str | None = None) -> _Plan:
    """Stage 1: every check that needs no change to the model."""
    if not isinstance(cfg, LoraLiteConfig):
        raise ConfigError(
            f"attach expects a lora_lite.LoraLiteConfig, got {type(cfg).__name__}; "
            "build one with lora_lite.LoraLiteConfig(variant=..., r=..., ...)."
        )
    if not isinstance(model, nn.Module):
        raise AttachError(
            f"attach expects a torch.nn.Module, got {type(model).__name__}; pass the model as the first argument."
        )
    variant = get_variant(cfg.variant)
    if not isinstance(cfg, variant.config_class):
        raise ConfigError(
            f"config is a {type(cfg).__name__} but variant {cfg.variant!r} expects {variant.config_class.__name__}; "
            f"build it with lora_lite.LoraLiteConfig(variant={cfg.variant!r}, ...)."
        )
    targets = find_targets(model, cfg)
    existing = model.__dict__.get(_STATE_ATTR)
    if existing is not None and existing.merged:
        raise MergeError(
            "the model's adapters are merged into its weights; call lora_lite.unmerge(model) before attaching "
            "or loading another adapter (or lora_lite.merge_and_unload(model) to make the merge permanent)."
        )
    name = _choose_name(existing, targets, name)
    meta = [t.name for t in targets if t.layer.weight.device.type == "meta"]
    if meta:
        raise AttachError(
            f"{meta[0]} (and {len(meta) - 1} more) live on the meta device; materialise the model "
            "(e.g. model.to_empty(device=...) and load its weights) before attaching."
        )
    _check_layer_kinds(variant, targets)
    params = list(model.named_parameters())  # one walk, for the sharding check and the flags
    _refuse_wrapped(model, params)
    if calibration_data is not None:
        if variant.hook("group_init") is None:
            raise ConfigError(
                f"variant {variant.name!r} takes no calibration data (it has no group_init hook); "
                "drop calibration_data, or pick a data-calibrated variant."
            )
        calibration_data = _checked_calibration(calibration_data)
    carried = _carried(existing)
    specs = _collect_specs(variant, targets, cfg, carried)
    return _Plan(model, cfg, variant, targets, specs, params, existing, calibration_data, name)


def _supports(variant: VariantInfo, layer: nn.Module) -> bool:
    kind = layer_kind(layer)
    linear_like = kind is None or not kind.by_name_only
    kinds = variant.layer_kinds if variant.layer_kinds is not None else (LINEAR_LIKE,)
    return (linear_like and LINEAR_LIKE in kinds) or kind_name(layer) in kinds


def _check_layer_kinds(variant: VariantInfo, targets: list[Target]) -> None:
    bad = [(t.name, kind_name(t.layer)) for t in targets if not _supports(variant, t.layer)]
    if bad:
        kinds = list(variant.layer_kinds or (LINEAR_LIKE,))
        raise TargetingError(
            f"variant {variant.name!r} supports the layer kinds {kinds}, but target {bad[0][0]} "
            f"is a {bad[0][1]!r} layer ({len(bad)} such target(s)). Keep those layers out of the targets "
            "(exclude_names), or use a variant that supports them (docs/layers.md has the table)."
        )


def _input_dtype(layer: nn.Module) -> torch.dtype:
    w = layer.weight
    return w.dtype if w.is_floating_point() else torch.float32


def _expect(got: Any, like: torch.Tensor, variant: VariantInfo, hook: str, t: Target) -> None:
    if isinstance(got, torch.Tensor) and got.shape == like.shape and got.dtype == like.dtype:
        return
    what = (f"a tensor of shape {tuple(got.shape)} and dtype {got.dtype}" if isinstance(got, torch.Tensor)
            else f"a {type(got).__name__}")
    raise PluginError(
        f"variant {variant.name!r}: hook {hook} on {t.name} ({type(t.layer).__name__} {t.d_in} -> {t.d_out}) returned "
        f"{what}; it must return one tensor of shape {tuple(like.shape)} and dtype {like.dtype} "
        f"(the same as its {'input x' if hook == 'forward_input' else 'base output y'})."
    )


def _check_forward(att: Attachment) -> None:
    """Stage 4: call the variant's forward hooks once per distinct target shape on a tiny
    input and check each returns one tensor of the right shape and dtype, so a bad hook
    fails here (and the attach rolls back) instead of deep inside the model later. The
    base layer itself is not called (bnb re-lays out its storage on a first forward)."""
    fwd, fwd_in = att.variant.hook("forward"), att.variant.hook("forward_input")
    seen = set()
    g = torch.Generator().manual_seed(0)
    for t, host in zip(att.targets, att.hosts):
        dtype = _input_dtype(t.layer)
        kind = layer_kind(host)
        key = (type(host), t.d_in, t.d_out, dtype)
        if key in seen:
            continue
        seen.add(key)
        device = t.layer.weight.device
        sample = kind is not None and kind.sample
        x = (kind.sample(host, g) if sample else torch.randn(2, t.d_in, generator=g)).to(device)
        x = x.to(dtype) if x.is_floating_point() else x
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if fwd_in is not None:
                got = fwd_in(t.layer, x)
                _expect(got, x, att.variant, "forward_input", t)
                x = got
            if fwd is not None:
                # a by-name-only kind (embedding, conv) is called for its output shape; a linear-like
                # one is not (bnb re-lays out storage on a first forward): any (2, d_out) will do
                y = host(x) if sample else torch.randn(2, t.d_out, generator=g).to(device, dtype)
                _expect(fwd(t.layer, x, y), y, att.variant, "forward", t)


def _merged_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The layer's forward run on the attachment's merged weight (a variant declaring
    ``merged_forward``): one base op on ``W'`` instead of the base op plus a hook adding
    ``x dW^T``. Bound to the layer as an instance attribute (a deep copy rebinds it)."""
    merge, read, name = self.__dict__[_MERGED_ATTR]
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        _bad_call(name, self, args, kwargs)
    weight, bias = merge(self, read(self), self.bias)
    return F.linear(args[0], weight, bias)


class _MergedForwardHandle:
    """Installs :func:`_merged_forward` on a layer; ``remove()`` puts the class's forward
    back, like a hook handle's (so set_active, merge, adapter_batch and detach treat it
    as one)."""

    def __init__(self, layer: nn.Module, merge: Any, read: Any, name: str) -> None:
        self.layer = layer
        layer.__dict__[_MERGED_ATTR] = (merge, read, name)
        layer.forward = types.MethodType(_merged_forward, layer)

    def remove(self) -> None:
        self.layer.__dict__.pop("forward", None)
        self.layer.__dict__.pop(_MERGED_ATTR, None)


def _runs_merged(att: Attachment, t: Target, host: nn.Module) -> Any:
    """The layer kind to run ``t`` through :func:`_merged_forward`, or None: the variant
    declares ``merged_forward``, the target is the layer itself (not a stacked slot), the
    kind is a dense linear (nn.Linear, GPT-2's Conv1D: ``read`` gives the ``(d_out, d_in)``
    weight) and nothing else replaced the layer's forward."""
    if not att.variant.merged_forward or t.layer is not host or "forward" in host.__dict__:
        return None
    kind = layer_kind(host)
    return kind if kind is not None and kind.name in _MERGED_KINDS else None


def _register_hooks(att: Attachment) -> None:
    """The forward pre-/post-hooks that make the attachment act (at attach, and at unmerge);
    for a ``merged_forward`` variant on a dense linear layer, the merged-weight forward."""
    fwd, fwd_in = att.variant.hook("forward"), att.variant.hook("forward_input")
    for t, host in zip(att.targets, att.hosts):
        kind = _runs_merged(att, t, host)
        if kind is not None:
            att.hook_handles.append(_MergedForwardHandle(host, att.variant.hook("merge"), kind.read, t.name))
            continue
        holder = None if t.layer is host else t.layer
        if fwd_in is not None:
            pre = _make_pre_hook(fwd_in, t.name, holder)
            att.hook_handles.append(host.register_forward_pre_hook(pre, with_kwargs=True))
        if fwd is not None:
            post = _make_post_hook(fwd, t.name, holder)
            att.hook_handles.append(host.register_forward_hook(post, with_kwargs=True))


def _remove_hooks(att: Attachment) -> None:
    for handle in att.hook_handles:
        handle.remove()
    att.hook_handles.clear()


def _build(plan: _Plan, *, calibrate: bool) -> Attachment:
    """Stages 2-5 (create tensors + init, calibrate, check forward, register hooks), all or
    nothing: any failure rolls the model back exactly and raises a typed error naming the
    variant, the stage and the layer."""
    model, cfg, variant, existing = plan.model, plan.cfg, plan.variant, plan.existing
    carried = _carried(existing)
    hosts = [t.layer for t in plan.targets]
    # the variant sees its own holder as the layer: the layer itself, or a fresh slot on it
    targets = [t if id(t.layer) not in carried else dataclasses.replace(t, layer=AdapterSlot(t.layer))
               for t in plan.targets]
    att = Attachment(model, cfg, variant, targets, plan.specs, plan.name, hosts=hosts)
    first = existing is None
    requires_grad = {n: p.requires_grad for n, p in plan.params} if first else existing.requires_grad
    init, group_init = variant.hook("init"), variant.hook("group_init")
    stage = "creating adapter tensors"
    try:
        for t, host in zip(targets, hosts):
            if t.layer is not host:
                host.add_module(_slot_name(plan.name), t.layer)
            device = t.layer.weight.device
            for pname, spec in plan.specs[t.name].items():
                t.layer.register_parameter(pname, spec.materialize(cfg.dtype, device))
            t.layer.lora_cfg = cfg
            if init is not None:
                stage = f"init of {t.name} ({type(t.layer).__name__})"
                init(t.layer, cfg, targets)
        if group_init is not None and calibrate:
            stage = "group_init"
            with _grads_preserved(model):
                group_init(model, targets, cfg, plan.calibration_data)
        stage = "checking the forward hooks"
        _check_forward(att)
        stage = "registering hooks"
        _register_hooks(att)
    except BaseException as err:
        _undo(att)
        if first:
            _restore_requires_grad(model, requires_grad)
        if isinstance(err, LoraLiteError):
            raise add_context(err, f"{variant.name}: {stage} (rolled back)")
        if not isinstance(err, Exception):
            raise
        raise AttachError(
            f"attaching variant {variant.name!r} failed during {stage}: {type(err).__name__}: {err}. "
            "The model was rolled back unchanged."
        ) from err

    if first:
        model.__dict__[_STATE_ATTR] = _ModelState([att], requires_grad)
    else:
        existing.attachments.append(att)
    _freeze_base(model, plan.params)
    return att


@contextmanager
def _grads_preserved(model: nn.Module):
    """Let ``group_init`` run backward: put back every parameter's ``requires_grad`` and
    ``.grad`` as they were, whatever happened inside."""
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    for p, _, _ in saved:
        p.grad = None  # stashed, not cleared: backward would accumulate into it in place
    try:
        yield
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad


def attach(
    model: nn.Module, cfg: LoraLiteConfig, calibration_data: Iterable[Any] | None = None, *, name: str | None = None,
) -> Attachment:
    """Attach ``cfg``'s variant to the targets ``cfg`` selects; return the :class:`Attachment`.

    ``name`` identifies the attachment (``set_active``, ``save(names=...)``, ``load(name=...)``);
    omitted, it is ``"default"`` (``"default_2"``, ... when taken). Several attachments may
    sit on one layer (stacking, applied in attach order) when the later ones are named.
    Everything that can be checked is checked before the model is touched; if creating
    tensors, ``init``, ``group_init`` or the check of the forward hooks fails midway the
    model is rolled back exactly. Afterwards only ``lora_*`` tensors require grad.
    """
    return _build(_plan(model, cfg, calibration_data, name), calibrate=True)


def attach_for_load(model: nn.Module, cfg: LoraLiteConfig, name: str | None = None) -> Attachment:
    """``attach`` as ``load`` needs it: every stage but calibration (the checkpoint holds
    what calibration chose). Internal to lora-lite (checkpoint loading)."""
    return _build(_plan(model, cfg, None, name), calibrate=False)


def _refuse_wrapped(model: nn.Module, params: list[tuple[str, nn.Parameter]]) -> None:
    """Adapters added after DDP/FSDP wrapping would never be synchronised or sharded."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise AttachError(
            "the model is already wrapped in DistributedDataParallel, whose gradient buckets are fixed at "
            "construction: the adapter would train out of sync. Attach (or load) first, then wrap: "
            "lora_lite.attach(model, cfg); model = DistributedDataParallel(model)."
        )
    sharded = next((n for n, p in params if callable(getattr(p, "full_tensor", None))), None)
    if sharded is not None:
        raise AttachError(
            f"the model is already sharded (parameter {sharded} is a DTensor, e.g. from FSDP2 fully_shard); "
            "adapter tensors added now would be neither sharded nor reduced. Attach (or load) first, then "
            "call fully_shard."
        )


def _freeze_base(model: nn.Module, params: list[tuple[str, nn.Parameter]]) -> None:
    """Freeze every parameter of ``params`` (the model's, from before this attach) that is
    not an adapter tensor of an earlier attachment; the new adapter tensors are not in it."""
    adapter = {id(p) for a in _state(model).attachments for p in a.adapter_tensors().values()}
    for _, p in params:
        if p.requires_grad and id(p) not in adapter:
            p.requires_grad_(False)


def _restore_requires_grad(model: nn.Module, flags: dict[str, bool]) -> None:
    for name, p in model.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])


def _undo(att: Attachment, restore_weights: bool = True) -> None:
    """Remove the attachment's hooks, tensors and ``lora_*``/``_lora_lite*`` attributes;
    with ``restore_weights`` also put back any base weight its init replaced."""
    _remove_hooks(att)
    for t, host in zip(att.targets, att.hosts):
        layer = t.layer
        if restore_weights:
            restore_dense_weight(layer)
        if layer is not host:  # a slot: its tensors and attributes go with it
            host._modules.pop(_slot_name(att.name), None)
            continue
        for pname in [n for n in layer._parameters if n.startswith(_OWNED_PREFIXES)]:
            del layer._parameters[pname]
        for bname in [n for n in layer._buffers if n.startswith(_OWNED_PREFIXES)]:
            del layer._buffers[bname]
            layer._non_persistent_buffers_set.discard(bname)
        for attr in [n for n in layer.__dict__ if n.startswith(_OWNED_PREFIXES)]:
            del layer.__dict__[attr]
    att.live = False


def set_active(model: nn.Module, names: str | Iterable[str]) -> None:
    """Make exactly the attachments called ``names`` act; the others stay attached (tensors,
    optimizer state and all) but cost nothing on the forward path: their hooks are removed
    until they are activated again. Stacked attachments act in attach order."""
    state = _state(model)
    wanted = [names] if isinstance(names, str) else list(names)
    known = [a.name for a in state.attachments]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise NotAttachedError(f"no attachment named {unknown} on this model; attachments: {known}.")
    if state.merged:
        raise MergeError("the model's adapters are merged; lora_lite.unmerge(model) before switching attachments.")
    for att in state.attachments:
        _remove_hooks(att)
    for att in state.attachments:  # in attach order, so stacked hooks keep their order
        att.active = att.name in wanted
        if att.active:
            _register_hooks(att)


@contextmanager
def adapter_batch(model: nn.Module, ids: Sequence[str | None]):
    """Within the block, example ``i`` of each batch runs with the attachment named ``ids[i]``
    alone (``None``: the base model), for additive variants (``VariantInfo.additive``).

    Each adapted layer gets one hook that runs every attachment named in ``ids`` on its own
    rows (gathered with one index per attachment, no loop over examples) and writes them
    into the base output, so row ``i`` is what that attachment alone computes. The usual
    hooks are back when the block ends, whatever happened inside.
    """
    state = _state(model)
    ids = list(ids)
    known = {a.name: a for a in state.attachments}
    unknown = sorted({i for i in ids if i is not None and i not in known})
    if not ids or unknown:
        raise NotAttachedError(
            f"adapter_batch ids name no attachment {unknown or '(empty ids)'}; attachments: {list(known)} (or None "
            "for the base model), one entry per example of the batch."
        )
    if state.merged:
        raise MergeError("the model's adapters are merged; lora_lite.unmerge(model) before mixing attachments per row.")
    used = [a for a in state.attachments if a.name in ids]
    bad = sorted({a.variant.name for a in used if not a.variant.is_additive(a.cfg)})
    if bad:
        raise ConfigError(
            f"adapter_batch mixes additive variants only (y + delta(x), no input transform or rewritten weight); "
            f"{bad} are not. Run those attachments one at a time (lora_lite.set_active)."
        )
    rows = {a.name: torch.tensor([i for i, n in enumerate(ids) if n == a.name]) for a in used}
    per_host: dict[int, tuple[nn.Module, str, list]] = {}
    for att in used:
        fwd = att.variant.hook("forward")
        for t, host in zip(att.targets, att.hosts):
            per_host.setdefault(id(host), (host, t.name, []))[2].append((fwd, t.layer, rows[att.name]))
    for att in state.attachments:
        _remove_hooks(att)
    handles = []
    try:
        for host, name, entries in per_host.values():
            handles.append(host.register_forward_hook(_mixed_hook(name, len(ids), entries), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for att in state.attachments:
            if att.active:
                _register_hooks(att)


def _mixed_hook(name: str, n: int, entries: list):
    def hook(module, args, kwargs, y):
        if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            _bad_call(name, module, args, kwargs)
        x = args[0]
        if x.shape[0] != n:
            raise ForwardError(
                f"{name} got a batch of {x.shape[0]} examples inside lora_lite.adapter_batch with {n} ids; "
                "pass one id per example."
            )
        out = y
        for fwd, holder, idx in entries:
            idx = idx.to(x.device)
            out = out.index_copy(0, idx, fwd(holder, x.index_select(0, idx), y.index_select(0, idx)))
        return out

    return hook


def step(model: nn.Module) -> None:
    """Advance every attachment's schedule by one training step (the ``step`` hook, e.g.
    AdaLoRA's rank allocation). Call it after ``optimizer.step()`` and before
    ``optimizer.zero_grad()``; a no-op for variants without a schedule::

        loss = model(x).loss + lora_lite.regularization_loss(model)
        loss.backward(); opt.step(); lora_lite.step(model); opt.zero_grad()
    """
    for att in _state(model).attachments:
        hook = att.variant.hook("step")
        if hook is not None:
            hook(model, att.targets, att.cfg)


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """The sum of every attachment's ``regularization_loss`` term (a 0-d tensor; zero when
    no variant has one), to add to the training loss before ``backward``."""
    terms = []
    for att in _state(model).attachments:
        hook = att.variant.hook("regularization_loss")
        term = hook(model, att.targets, att.cfg) if hook is not None else None
        if term is not None:
            if not isinstance(term, torch.Tensor) or term.numel() != 1:
                raise PluginError(
                    f"variant {att.variant.name!r}: regularization_loss must return a scalar tensor or None, got {term!r}."
                )
            terms.append(term.reshape(()))
    if not terms:
        return torch.zeros((), device=next(model.parameters(), torch.zeros(())).device)
    return sum(terms[1:], terms[0])


def detach(model: nn.Module) -> None:
    """Remove every adapter from ``model``: hooks, tensors, weight changes, requires_grad changes."""
    state = _state(model)
    for att in reversed(list(state.attachments)):
        att.detach()
