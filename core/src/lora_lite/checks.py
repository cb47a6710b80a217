"""The variant contract, written once, as plain check functions.

Each check takes a :class:`Subject` (how to build a model, a batch, a config, a loss and
calibration data for one variant) and either returns its measurements (a dict of numbers)
or raises ``AssertionError`` with the numbers that failed. Three callers share them, the
way scikit-learn's estimator checks serve both ``check_estimator`` and
``parametrize_with_checks``:

- :class:`lora_lite.testing.VariantConformance` turns every check into a pytest test of a
  plugin's own test suite;
- ``lora-lite probe`` runs :data:`PROBE_CHECKS` on a causal LM and tabulates the
  measurements;
- :func:`run_checks` runs any list of them on any subject (the monorepo runs them over
  every variant x model x layer kind through it).

One tolerance table, :data:`IDENTITY_ATOL`, serves all of them.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load, save
from .config import LoraLiteConfig
from .errors import AlreadyAttachedError, CheckpointMismatchError
from .runtime import Attachment, attach, attachments, detach

# max |output difference| allowed for "the same function", by the dtype the model computes in
IDENTITY_ATOL = {torch.float32: 1e-5, torch.float64: 1e-9, torch.bfloat16: 5e-2, torch.float16: 1e-2}
PERTURB_MIN = 1e-6  # hooks are live when nudging the adapter moves the outputs by more than this


def _no_calibration(model: nn.Module) -> Any:
    return None


@dataclass
class Subject:
    """One variant on one model: what every check needs.

    :param make_model: a fresh base model (same weights every call).
    :param make_batch: ``model -> batch``.
    :param run: ``(model, batch) -> output tensor`` the checks compare.
    :param objective: ``(model, batch) -> loss_fn`` with ``loss_fn(model) -> scalar``; called
        once on the model before training (a regression target may be fixed there).
    :param make_config: ``(**overrides) -> LoraLiteConfig`` for this variant.
    :param calibration: ``model -> calibration_data`` for ``attach`` (``None``: no data).
    :param workdir: where save/load checks write their files (a temporary one if ``None``).
    :param identity_atol: ``model -> tolerance`` for "same outputs" (default: :data:`IDENTITY_ATOL`
        by the model's dtype).
    :param on_step: called after every optimizer step (progress bars).
    :param merge_options: keyword arguments of ``merge`` / ``merge_and_unload`` in the merge
        check (``{"dequantize": True}`` on a bitsandbytes model).
    """

    variant: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[nn.Module], Any]
    run: Callable[[nn.Module, Any], torch.Tensor]
    objective: Callable[[nn.Module, Any], Callable[[nn.Module], torch.Tensor]]
    make_config: Callable[..., LoraLiteConfig]
    calibration: Callable[[nn.Module], Any] = _no_calibration
    train_steps: int = 20
    train_lr: float = 1e-2
    min_loss_drop: float = 0.05
    seed: int = 0
    workdir: Path | None = None
    identity_atol: Callable[[nn.Module], float] | None = None  # default: IDENTITY_ATOL by the model's dtype
    on_step: Callable[[], None] = field(default=lambda: None)
    merge_options: dict[str, Any] = field(default_factory=dict)

    def with_(self, **changes: Any) -> Subject:
        return replace(self, **changes)

    # -- helpers the checks share -------------------------------------------------------
    def attach(self, model: nn.Module, cfg: LoraLiteConfig | None = None) -> Attachment:
        torch.manual_seed(self.seed)  # random adapter inits are reproducible run to run
        return attach(model, cfg or self.make_config(), calibration_data=self.calibration(model))

    def outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        with torch.no_grad():
            return self.run(model, batch).detach().clone()

    def atol(self, model: nn.Module) -> float:
        if self.identity_atol is not None:
            return self.identity_atol(model)
        return IDENTITY_ATOL[next(p.dtype for p in model.parameters() if p.is_floating_point())]

    def train(self, model: nn.Module, batch: Any, steps: int, lr: float) -> tuple[list[float], float]:
        """AdamW on the fixed batch: the loss before each step and after the last, and the
        first step's adapter gradient norm."""
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        loss_fn = self.objective(model, batch)  # in the model's own mode: bnb's CPU kernels repack weights on mode changes
        losses, first_grad = [], math.nan
        for step in range(steps):
            loss = loss_fn(model)
            opt.zero_grad()
            loss.backward()
            if step == 0:
                grads = [p.grad.detach().float().flatten() for p in params if p.grad is not None]
                first_grad = torch.cat(grads).norm().item() if grads else 0.0
            opt.step()
            losses.append(loss.item())
            self.on_step()
        with torch.no_grad():
            losses.append(loss_fn(model).item())
        return losses, first_grad

    def trained(self, steps: int = 5) -> tuple[nn.Module, Any, Attachment]:
        model = self.make_model()
        batch = self.make_batch(model)
        att = self.attach(model)
        self.train(model, batch, steps=steps, lr=self.train_lr)
        return model, batch, att

    def path(self, name: str) -> Path:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="lora-lite-checks-"))
        return Path(self.workdir) / f"{self.variant}-{name}"


class CheckFailed(AssertionError):
    """A check's assertion failed; ``measured`` holds the numbers it had taken (the probe shows them)."""

    def __init__(self, message: str, measured: dict[str, Any]) -> None:
        super().__init__(message)
        self.measured = measured


def _expect(ok: bool, message: str, measured: dict[str, Any]) -> dict[str, Any]:
    if not ok:
        raise CheckFailed(message, measured)
    return measured


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# -- the checks --------------------------------------------------------------------------


def check_identity_at_init(s: Subject) -> dict[str, float]:
    """Attaching leaves the outputs unchanged (within the dtype's tolerance)."""
    model = s.make_model()
    batch = s.make_batch(model)
    base = s.outputs(model, batch)
    att = s.attach(model)
    err = _max_abs(s.outputs(model, batch), base)
    atol = s.atol(model)
    measured = {"identity_err": err, "targets": len(att.targets), "target_names": att.target_names,
                "trainable": sum(p.numel() for p in att.trainable_parameters())}
    return _expect(err <= atol, f"identity error {err:.3e} at init > {atol:g}", measured)


def check_identity_with_bf16_adapter_storage(s: Subject) -> dict[str, float]:
    """bf16 adapter storage keeps the activation dtype and the identity (10x the tolerance)."""
    model = s.make_model()
    batch = s.make_batch(model)
    base = s.outputs(model, batch)
    s.attach(model, s.make_config(dtype=torch.bfloat16))
    out = s.outputs(model, batch)
    assert out.dtype == base.dtype, f"the adapter changed the activation dtype: {base.dtype} -> {out.dtype}"
    err = _max_abs(out, base)
    assert err <= 10 * s.atol(model), f"identity error {err:.3e} with bf16 adapter storage"
    return {"identity_err_bf16": err}


def perturb_adapter(att: Attachment, seed: int) -> None:
    """Move every trainable adapter tensor by seeded noise of ~10% of its mean magnitude."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in att.trainable_parameters():
            noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
            p.add_(noise * 0.1 * (p.detach().float().abs().mean().item() + 0.1))


def check_hooks_are_live(s: Subject) -> dict[str, float]:
    """Nudging every trainable adapter tensor changes the outputs."""
    model = s.make_model()
    batch = s.make_batch(model)
    att = s.attach(model)
    before = s.outputs(model, batch)
    perturb_adapter(att, s.seed + 7)
    delta = _max_abs(s.outputs(model, batch), before)
    return _expect(delta > PERTURB_MIN, f"perturbing the adapter changed the outputs by {delta:.3g}: hooks not live",
                   {"perturb_delta": delta})


def check_only_adapter_tensors_get_gradients(s: Subject) -> dict[str, float]:
    """Only ``lora_*`` tensors train; no base tensor gets a gradient or changes."""
    model = s.make_model()
    batch = s.make_batch(model)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    att = s.attach(model)
    adapter = {id(p) for p in att.adapter_tensors().values()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "no trainable parameters after attach"
    leaked = [n for n in trainable if ".lora_" not in n]
    assert not leaked, f"non-adapter parameters are trainable: {leaked[:5]}"
    s.train(model, batch, steps=3, lr=s.train_lr)
    grads = [n for n, p in model.named_parameters() if id(p) not in adapter and p.grad is not None]
    assert not grads, f"base parameters received gradients: {grads[:5]}"
    detach(model)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, base_state[k])]
    assert not changed, f"base tensors changed: {changed[:5]}"
    return {"trainable_tensors": len(trainable)}


def check_gradients_finite_and_nonzero(s: Subject) -> dict[str, float]:
    """After two steps, every trainable adapter tensor gets a finite, non-zero gradient."""
    model = s.make_model()
    batch = s.make_batch(model)
    att = s.attach(model)
    s.train(model, batch, steps=2, lr=s.train_lr)
    model.zero_grad(set_to_none=True)
    s.objective(model, batch)(model).backward()
    dead = [name for name, p in att.adapter_tensors().items()
            if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0)]
    assert not dead, f"adapter tensors without a finite non-zero gradient: {dead[:8]} ({len(dead)} in all)"
    return {"grad_norm_sum": sum(float(p.grad.norm()) for p in att.trainable_parameters())}


def check_loss_drops(s: Subject) -> dict[str, Any]:
    """``train_steps`` AdamW steps at ``train_lr`` cut the loss by more than ``min_loss_drop``."""
    model = s.make_model()
    batch = s.make_batch(model)
    att = s.attach(model)
    before = {k: v.detach().clone() for k, v in att.adapter_tensors().items()}
    losses, grad_norm = s.train(model, batch, steps=s.train_steps, lr=s.train_lr)
    after = att.adapter_tensors()
    moved = sum((after[k].detach().float() - before[k].float()).norm().item() for k in before)
    drop = 1 - losses[-1] / losses[0]
    out = {"loss0": losses[0], "lossN": losses[-1], "drop_pct": 100 * drop, "grad_norm": grad_norm,
           "adapter_delta": moved, "losses": losses}
    _expect(math.isfinite(grad_norm) and grad_norm > 0, f"first-step adapter grad norm is {grad_norm}", out)
    return _expect(drop > s.min_loss_drop, f"loss dropped {drop:.1%} in {s.train_steps} steps "
                   f"({losses[0]:.4g} -> {losses[-1]:.4g}), needs > {s.min_loss_drop:.1%}", out)


def check_every_trainable_tensor_moves(s: Subject) -> dict[str, float]:
    """bf16 storage, lr 1e-4, 20 AdamW steps: every trainable tensor changes (rounding must not freeze it)."""
    model = s.make_model()
    batch = s.make_batch(model)
    att = s.attach(model, s.make_config(dtype=torch.bfloat16))
    start = {k: v.detach().clone() for k, v in att.adapter_tensors().items() if v.requires_grad}
    s.train(model, batch, steps=20, lr=1e-4)
    stuck = [k for k, v in att.adapter_tensors().items() if k in start and torch.equal(v.detach(), start[k])]
    assert not stuck, f"trainable tensors did not move (storage rounding or dead gradient): {stuck[:5]}"
    return {"moved_tensors": len(start)}


def check_save_load_into_fresh_model_is_exact(s: Subject) -> dict[str, float]:
    """A trained adapter saved and loaded into a fresh base gives the same tensors and outputs."""
    model, batch, att = s.trained()
    trained_out = s.outputs(model, batch)
    saved = {k: v.detach().clone() for k, v in att.adapter_tensors(persistent_only=True).items()}
    path = save(model, s.path("adapter.safetensors"))
    fresh = s.make_model()
    (loaded,) = load(fresh, path)
    got = loaded.adapter_tensors(persistent_only=True)
    assert sorted(got) == sorted(saved), f"reloaded keys differ: {sorted(set(got) ^ set(saved))[:5]}"
    differ = [k for k, v in saved.items() if not torch.equal(got[k], v)]
    assert not differ, f"tensors differ after reload: {differ[:5]}"
    err = _max_abs(s.outputs(fresh, batch), trained_out)
    return _expect(err == 0, f"reloaded outputs differ by {err:.3g}", {"reload_err": err})


def check_save_detach_load_same_model_is_exact(s: Subject) -> dict[str, float]:
    """save -> detach -> load on the same model restores the trained outputs exactly."""
    model, batch, _ = s.trained()
    trained_out = s.outputs(model, batch)
    path = save(model, s.path("adapter.bin"))
    detach(model)
    load(model, path)
    err = _max_abs(s.outputs(model, batch), trained_out)
    assert err == 0, f"save -> detach -> load is not exact: outputs differ by {err:.3g}"
    return {"reload_same_err": err}


def check_state_dict_has_full_path_adapter_keys(s: Subject) -> dict[str, float]:
    """Adapter tensors appear in ``model.state_dict()`` under their full module paths."""
    model = s.make_model()
    att = s.attach(model)
    keys = set(model.state_dict())
    missing = [k for k in att.adapter_tensors() if k not in keys]
    assert not missing, f"adapter tensors missing from model.state_dict(): {missing[:5]}"
    return {"adapter_keys": len(att.adapter_tensors())}


def check_missing_and_unexpected_keys_fail_loudly(s: Subject) -> dict[str, float]:
    """A checkpoint with a missing or an extra key fails with a typed error naming it; the model is untouched."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, batch, _ = s.trained()
    path = save(model, s.path("keys.safetensors"))
    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    dropped = sorted(tensors)[0]
    extra = sorted(tensors)[0].rsplit(".lora_", 1)[0] + ".lora_bogus"
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(s.path("missing.safetensors")), metadata=meta)
    save_file({**tensors, extra: torch.zeros(1)}, str(s.path("extra.safetensors")), metadata=meta)
    for name, key in (("missing", dropped), ("extra", extra)):
        fresh = s.make_model()
        before = s.outputs(fresh, batch)
        try:
            load(fresh, s.path(f"{name}.safetensors"))
        except CheckpointMismatchError as err:
            assert key in str(err), f"the error does not name {key}: {err}"
        else:
            raise AssertionError(f"loading a checkpoint with a {name} key did not fail")
        assert not attachments(fresh), "a failed load left an adapter attached"
        assert torch.equal(s.outputs(fresh, batch), before), "a failed load changed the model"
    return {}


def check_detach_restores_outputs_and_requires_grad(s: Subject) -> dict[str, float]:
    """Detach after training restores outputs, ``requires_grad`` flags, state_dict keys; no hooks left."""
    model = s.make_model()
    batch = s.make_batch(model)
    next(model.parameters()).requires_grad_(False)  # a user-frozen tensor must stay frozen
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    base_out = s.outputs(model, batch)
    base_keys = set(model.state_dict())
    s.attach(model)
    s.train(model, batch, steps=3, lr=s.train_lr)
    detach(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags, "requires_grad flags changed"
    assert set(model.state_dict()) == base_keys, "detach left adapter tensors behind"
    err = _max_abs(s.outputs(model, batch), base_out)
    assert err == 0, f"detach did not restore the outputs (max diff {err:.3g})"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "detach left hooks"
    return {"detach_err": err}


def check_attach_twice_raises(s: Subject) -> dict[str, float]:
    """A second unnamed attach on the same targets raises AlreadyAttachedError and changes nothing."""
    model = s.make_model()
    s.attach(model)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        s.attach(model)
    except AlreadyAttachedError:
        pass
    else:
        raise AssertionError("a second attach on the same targets did not raise AlreadyAttachedError")
    after = model.state_dict()
    assert set(after) == set(snapshot) and all(torch.equal(after[k], v) for k, v in snapshot.items()), (
        "the refused attach changed the model"
    )
    return {}


def _hooks_match_merge(att: Attachment, seed: int) -> float:
    """Per dense linear target (``nn.Linear``, GPT-2's ``Conv1D``): the layer computed through
    the variant's ``forward_input`` / ``forward`` hooks against ``F.linear`` on the weight and
    bias its ``merge`` hook returns, on a random input; the max difference relative to the
    output's scale. This holds whichever way the model runs the layer (a ``merged_forward``
    variant's layers run on the merged weight, so the model-level comparison alone would not
    see a wrong ``forward`` hook)."""
    from .runtime import _MERGED_KINDS
    from .weights import layer_kind

    fwd, fwd_in, merge = (att.variant.hook(h) for h in ("forward", "forward_input", "merge"))
    g = torch.Generator().manual_seed(seed + 13)
    worst = 0.0
    for t, host in zip(att.targets, att.hosts):
        kind = layer_kind(host)
        if t.layer is not host or kind is None or kind.name not in _MERGED_KINDS:
            continue
        w, b = kind.read(host), getattr(host, "bias", None)
        x = torch.randn(3, t.d_in, generator=g).to(w.device, w.dtype)
        with torch.no_grad():
            xi = fwd_in(t.layer, x) if fwd_in is not None else x
            y = torch.nn.functional.linear(xi, w, b)
            hooked = fwd(t.layer, xi, y) if fwd is not None else y
            # merge takes and returns float32 (as ll.merge calls it); the hooks run in the layer's dtype
            mw, mb = merge(t.layer, w.detach().float(), None if b is None else b.detach().float())
            merged = torch.nn.functional.linear(x.float(), mw.float(), None if mb is None else mb.float())
        scale = max(hooked.abs().max().item(), 1.0)
        worst = max(worst, (merged.float() - hooked.float()).abs().max().item() / scale)
    return worst


def check_merge_equals_hooked(s: Subject) -> dict[str, float]:
    """For a variant with a ``merge`` hook, on an adapter moved away from the identity:
    merged outputs equal hooked ones (relative tolerance), on every dense linear target the
    ``forward``/``forward_input`` hooks equal ``F.linear`` on the merged weight (relative
    tolerance), the hooks stop contributing,
    ``unmerge`` restores every tensor bit for bit and the hooked outputs exactly, and
    ``merge_and_unload`` leaves no hooks and no ``lora_*`` tensors. A variant without a
    merge hook passes with ``mergeable: 0``."""
    from .merging import merge, merge_and_unload, unmerge

    model = s.make_model()
    batch = s.make_batch(model)
    att = s.attach(model)
    if not att.variant.mergeable:
        return {"mergeable": 0}
    base = s.outputs(model, batch)
    perturb_adapter(att, s.seed + 11)
    hooked = s.outputs(model, batch)
    moved = _max_abs(hooked, base)
    assert moved > PERTURB_MIN, f"the perturbed adapter changed nothing ({moved:.3g}): the check would be void"
    layer_err = _hooks_match_merge(att, s.seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merge(model, **s.merge_options)
    merged = s.outputs(model, batch)
    tol = s.atol(model) * max(hooked.abs().max().item(), 1.0)
    err = _max_abs(merged, hooked)
    measured = {"mergeable": 1, "merge_err": err, "layer_merge_err": layer_err}
    _expect(layer_err <= s.atol(model) * 10, f"on one layer, the forward hooks and the merge hook disagree by "
            f"{layer_err:.3g} (relative)", measured)
    _expect(err <= tol, f"merged outputs differ from hooked ones by {err:.3g} (> {tol:.3g})", measured)
    perturb_adapter(att, s.seed + 12)
    ghost = _max_abs(s.outputs(model, batch), merged)
    _expect(ghost == 0, f"after merge the hooks still contribute: changing the adapter moved the outputs by {ghost:.3g}",
            measured)
    unmerge(model)
    after = model.state_dict()
    changed = [k for k, v in state.items() if k not in after or not same_bits(after[k], v)]
    # the second perturbation moved the adapter tensors themselves: compare base tensors only
    changed = [k for k in changed if ".lora_" not in k]
    _expect(not changed and set(after) == set(state), f"unmerge did not restore the base tensors: {changed[:5]}",
            measured)
    with torch.no_grad():
        for k, p in att.adapter_tensors().items():
            if k in state:
                p.copy_(state[k])
    err_back = _max_abs(s.outputs(model, batch), hooked)
    _expect(err_back == 0, f"after unmerge the hooked outputs differ by {err_back:.3g}", measured)
    merge_and_unload(model, **s.merge_options)
    left = [k for k in model.state_dict() if ".lora_" in k]
    _expect(not left, f"merge_and_unload left adapter tensors: {left[:5]}", measured)
    hooks = [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    _expect(not hooks, f"merge_and_unload left hooks on {hooks[:5]}", measured)
    err_unload = _max_abs(s.outputs(model, batch), merged)
    return _expect(err_unload <= tol, f"after merge_and_unload outputs differ from merged ones by {err_unload:.3g}",
                   {**measured, "unload_err": err_unload})


def check_stacking_set_active_and_save_load(s: Subject) -> dict[str, float]:
    """Two named attachments of the variant stacked on the same targets: switching with
    ``set_active`` and back is exact and keeps the same tensor objects; saving both and
    loading them into a fresh base reproduces the stacked outputs exactly; detaching the
    second leaves exactly the model with the first alone (as loading the first alone into a
    fresh base gives); for additive variants the first alone also equals the stack with the
    second switched off."""
    from .runtime import set_active

    model = s.make_model()
    batch = s.make_batch(model)
    cfg = s.make_config()
    torch.manual_seed(s.seed)
    a = attach(model, cfg, name="a", calibration_data=s.calibration(model))
    perturb_adapter(a, s.seed + 21)
    torch.manual_seed(s.seed + 1)
    b = attach(model, cfg, name="b", calibration_data=s.calibration(model))
    perturb_adapter(b, s.seed + 22)
    both = s.outputs(model, batch)
    ids = {k: id(v) for k, v in {**a.adapter_tensors(), **b.adapter_tensors()}.items()}
    set_active(model, ["a"])
    only_a = s.outputs(model, batch)
    set_active(model, ["a", "b"])
    err_switch = _max_abs(s.outputs(model, batch), both)
    measured = {"stack_switch_err": err_switch}
    _expect(err_switch == 0, f"set_active away and back changed the outputs by {err_switch:.3g}", measured)
    same = {k: id(v) for k, v in {**a.adapter_tensors(), **b.adapter_tensors()}.items()}
    _expect(same == ids, "set_active re-created adapter tensors (optimizer state would be lost)", measured)
    path = save(model, s.path("stack.safetensors"))
    fresh = s.make_model()
    loaded = load(fresh, path)
    _expect([x.name for x in loaded] == ["a", "b"], f"loaded names {[x.name for x in loaded]}, expected ['a', 'b']",
            measured)
    err_load = _max_abs(s.outputs(fresh, batch), both)
    measured["stack_reload_err"] = err_load
    _expect(err_load == 0, f"the reloaded stack differs from the saved one by {err_load:.3g}", measured)
    alone_path = save(model, s.path("stack-a.safetensors"), names=["a"])
    alone = s.make_model()
    load(alone, alone_path)
    a_alone = s.outputs(alone, batch)
    if a.variant.is_additive(a.cfg):
        err_active = _max_abs(only_a, a_alone)
        measured["stack_active_err"] = err_active
        _expect(err_active == 0, f"with 'b' switched off the stack differs from 'a' alone by {err_active:.3g}", measured)
    b.detach()
    err_detach = _max_abs(s.outputs(model, batch), a_alone)
    measured["stack_detach_err"] = err_detach
    return _expect(err_detach == 0, f"detaching 'b' left a model that differs from 'a' alone by {err_detach:.3g}",
                   measured)


def check_mixed_batch_rows(s: Subject) -> dict[str, float]:
    """For an additive variant: inside ``adapter_batch(model, ids)`` row i of the output
    equals what attachment ``ids[i]`` alone gives (``None``: the base), with two named
    attachments. Other variants pass with ``additive: 0``."""
    from .runtime import adapter_batch, set_active

    model = s.make_model()
    batch = s.make_batch(model)
    cfg = s.make_config()
    torch.manual_seed(s.seed)
    a = attach(model, cfg, name="a", calibration_data=s.calibration(model))
    if not a.variant.is_additive(a.cfg):
        return {"additive": 0}
    perturb_adapter(a, s.seed + 31)
    torch.manual_seed(s.seed + 1)
    b = attach(model, cfg, name="b", calibration_data=s.calibration(model))
    perturb_adapter(b, s.seed + 32)
    alone = {}
    for name in ("a", "b"):
        set_active(model, [name])
        alone[name] = s.outputs(model, batch)
    set_active(model, [])
    alone[None] = s.outputs(model, batch)
    set_active(model, ["a", "b"])
    rows = alone["a"].shape[0]
    ids = [("a", None, "b")[i % 3] for i in range(rows)]
    with adapter_batch(model, ids):
        mixed = s.outputs(model, batch)
    tol = s.atol(model) * max(mixed.abs().max().item(), 1.0)
    errs = [_max_abs(mixed[i], alone[name][i]) for i, name in enumerate(ids)]
    worst = max(errs)
    return _expect(worst <= tol, f"mixed-batch rows differ from each attachment alone by up to {worst:.3g} "
                   f"(rows {ids})", {"additive": 1, "mixed_batch_err": worst})


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (bnb packs 4-bit codes into float storage, where some bytes read as NaN)."""
    flat = lambda t: t.detach().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(flat(a), flat(b))


def check_config_round_trips_through_dict(s: Subject) -> dict[str, float]:
    """``LoraLiteConfig.from_dict(cfg.to_dict())`` gives back an equal config of the same class."""
    cfg = s.make_config()
    again = LoraLiteConfig.from_dict(copy.deepcopy(cfg.to_dict()))
    assert again == cfg and type(again) is type(cfg), f"{cfg!r} came back as {again!r}"
    return {}


CHECKS: tuple[Callable[[Subject], dict[str, Any]], ...] = (
    check_identity_at_init, check_identity_with_bf16_adapter_storage, check_hooks_are_live,
    check_only_adapter_tensors_get_gradients, check_gradients_finite_and_nonzero, check_loss_drops,
    check_every_trainable_tensor_moves, check_save_load_into_fresh_model_is_exact,
    check_save_detach_load_same_model_is_exact, check_state_dict_has_full_path_adapter_keys,
    check_missing_and_unexpected_keys_fail_loudly, check_detach_restores_outputs_and_requires_grad,
    check_attach_twice_raises, check_config_round_trips_through_dict, check_merge_equals_hooked,
    check_stacking_set_active_and_save_load, check_mixed_batch_rows,
)
"""Every check, in the order the kit runs them."""

PROBE_CHECKS = (check_identity_at_init, check_hooks_are_live, check_only_adapter_tensors_get_gradients,
                check_loss_drops, check_save_load_into_fresh_model_is_exact)
"""What ``lora-lite probe`` measures per variant on a causal LM."""


def check_name(check: Callable[..., Any]) -> str:
    """``check_identity_at_init`` -> ``identity_at_init``."""
    return check.__name__.removeprefix("check_")


def run_checks(subject: Subject, checks: Iterable[Callable[[Subject], dict[str, Any]]] = CHECKS,
               ) -> tuple[dict[str, Any], dict[str, str]]:
    """Run ``checks`` on ``subject``: ``(measurements merged, {check name: failure})``.

    Nothing raises: an AssertionError or any other exception from a check is recorded as
    that check's failure and the next check runs.
    """
    measured: dict[str, Any] = {}
    failures: dict[str, str] = {}
    for check in checks:
        try:
            measured.update(check(subject))
        except CheckFailed as err:
            measured.update(err.measured)
            failures[check_name(check)] = str(err)
        except AssertionError as err:
            failures[check_name(check)] = str(err)
        except Exception as err:  # a plugin bug must not hide the other checks' results
            failures[check_name(check)] = f"{type(err).__name__}: {err}"
    return measured, failures


__all__ = ["CHECKS", "CheckFailed", "perturb_adapter", "same_bits", "IDENTITY_ATOL", "PERTURB_MIN", "PROBE_CHECKS", "Subject", "check_name", "run_checks"] + [
    c.__name__ for c in CHECKS
]
