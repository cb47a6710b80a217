"""Conformance kit: the contract every variant must meet, as a pytest class to subclass.

    # tests/test_conformance.py of your plugin
    from lora_lite.testing import VariantConformance

    class TestMyVariant(VariantConformance):
        variant = "myvariant"
        config_kwargs = {"r": 4, "my_knob": 0.5}

Run ``pytest`` and every check below runs against your variant on a small
transformer-shaped toy model. Override ``make_model`` / ``make_batch`` / ``run_model`` /
``loss_fn`` to run the same checks on another model (the monorepo runs them on
Qwen3-architecture transformers models too), and ``calibration_data`` for
data-calibrated variants. Install with ``pip install lora-lite-core[testing]``.

Each check asserts numbers: identity at init within a dtype tolerance, hooks live,
exact round trips, loud key errors, gradients only on adapter tensors, every trainable
tensor moves (with bf16 storage at lr 1e-4, where rounding freezes careless variants),
a >5% loss drop in 20 steps, and detach restoring outputs and ``requires_grad``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lora_lite as ll

# identity tolerance by the dtype the model computes in
IDENTITY_ATOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 5e-2, torch.float16: 5e-3}


class ToyBlock(nn.Module):
    """Attention-shaped and MLP-shaped linears with residuals: readers, writers, inner."""

    def __init__(self, d_model: int, d_ff: int, d_kv: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_kv)
        self.v_proj = nn.Linear(d_model, d_kv)
        self.kv_mix = nn.Linear(d_kv, d_kv)
        self.o_proj = nn.Linear(d_kv, d_model)
        self.up_proj = nn.Linear(d_model, d_ff)
        self.down_proj = nn.Linear(d_ff, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        gate = torch.sigmoid(self.k_proj(h))
        attn = self.o_proj(self.kv_mix(gate * self.v_proj(h))) + self.q_proj(h)
        x = x + attn
        return x + self.down_proj(torch.nn.functional.gelu(self.up_proj(self.norm(x))))


class ToyTransformer(nn.Module):
    """``model.layers.N.{q,k,v,o,up,down}_proj`` plus an ``lm_head`` (excluded by default)."""

    def __init__(self, d_model: int = 32, n_layers: int = 2, d_ff: int = 64, d_kv: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ToyBlock(d_model, d_ff, d_kv) for _ in range(n_layers))
        self.lm_head = nn.Linear(d_model, 48)
        self.d_model = d_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return self.lm_head(x)


def _outputs(model, fn, batch) -> torch.Tensor:
    with torch.no_grad():
        return fn(model, batch).detach().clone()


class VariantConformance:
    """Subclass and set ``variant`` (and ``config_kwargs``) to run the contract on a variant."""

    variant: str = ""
    config_kwargs: dict[str, Any] = {}
    seed: int = 0
    train_steps: int = 20
    train_lr: float = 1e-2
    min_loss_drop: float = 0.05

    # -- overridable fixtures ------------------------------------------------------
    def make_config(self, **overrides: Any) -> ll.LoraLiteConfig:
        kwargs = {"variant": self.variant, "r": 4, "alpha": 8, **self.config_kwargs, **overrides}
        return ll.LoraLiteConfig(**kwargs)

    def make_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return ToyTransformer().eval()

    def make_batch(self, model: nn.Module) -> Any:
        g = torch.Generator().manual_seed(self.seed + 1)
        return torch.randn(4, 6, model.d_model, generator=g)

    def run_model(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return model(batch)

    def loss_fn(self, model: nn.Module, batch: Any, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(self.run_model(model, batch), target)

    def calibration_data(self, model: nn.Module) -> Any:
        """Data for ``group_init``; ``None`` for weight-only variants."""
        return None

    def identity_atol(self, model: nn.Module) -> float:
        dtype = next(model.parameters()).dtype
        return IDENTITY_ATOL[dtype]

    # -- helpers -------------------------------------------------------------------
    def attach(self, model: nn.Module, cfg: ll.LoraLiteConfig | None = None) -> ll.Attachment:
        cfg = cfg or self.make_config()
        return ll.attach(model, cfg, calibration_data=self.calibration_data(model))

    def regression_target(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """A reachable target: the base output shifted by a smooth random function of it."""
        base = _outputs(model, self.run_model, batch)
        g = torch.Generator().manual_seed(self.seed + 2)
        mix = torch.randn(base.shape[-1], base.shape[-1], generator=g) / base.shape[-1] ** 0.5
        return base + 0.5 * torch.tanh(base.float() @ mix).to(base.dtype)

    def train(self, model: nn.Module, batch: Any, steps: int, lr: float) -> list[float]:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        target = self.regression_target(model, batch)
        losses = []
        for _ in range(steps):
            loss = self.loss_fn(model, batch, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    def trained(self) -> tuple[nn.Module, Any, ll.Attachment]:
        model = self.make_model()
        batch = self.make_batch(model)
        att = self.attach(model)
        self.train(model, batch, steps=5, lr=self.train_lr)
        return model, batch, att

    # -- the contract ----------------------------------------------------------------
    def test_identity_at_init(self):
        model = self.make_model()
        batch = self.make_batch(model)
        base = _outputs(model, self.run_model, batch)
        self.attach(model)
        err = (_outputs(model, self.run_model, batch) - base).abs().max().item()
        assert err <= self.identity_atol(model), f"identity error {err:.3e} at init"

    def test_identity_with_bf16_adapter_storage(self):
        model = self.make_model()
        batch = self.make_batch(model)
        base = _outputs(model, self.run_model, batch)
        self.attach(model, self.make_config(dtype=torch.bfloat16))
        out = _outputs(model, self.run_model, batch)
        assert out.dtype == base.dtype, "the adapter changed the activation dtype"
        err = (out - base).abs().max().item()
        assert err <= 10 * self.identity_atol(model), f"identity error {err:.3e} with bf16 adapter storage"

    def test_hooks_are_live(self):
        model = self.make_model()
        batch = self.make_batch(model)
        att = self.attach(model)
        before = _outputs(model, self.run_model, batch)
        with torch.no_grad():
            for p in att.trainable_parameters():
                p.add_(torch.randn_like(p) * 0.1 * (p.detach().float().abs().mean().item() + 0.1))
        after = _outputs(model, self.run_model, batch)
        assert (after - before).abs().max().item() > 1e-4, "perturbing the adapter tensors did not change the output"

    def test_only_adapter_tensors_get_gradients(self):
        model = self.make_model()
        batch = self.make_batch(model)
        base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        att = self.attach(model)
        adapter = {id(p) for p in att.adapter_tensors().values()}
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable, "no trainable parameters after attach"
        assert all(".lora_" in n for n in trainable), f"non-adapter parameters are trainable: {trainable}"
        self.train(model, batch, steps=3, lr=self.train_lr)
        for name, p in model.named_parameters():
            if id(p) not in adapter:
                assert p.grad is None, f"base parameter {name} received a gradient"
        ll.detach(model)
        for k, v in model.state_dict().items():
            assert torch.equal(v, base_state[k]), f"base tensor {k} changed"

    def test_every_trainable_tensor_moves(self):
        """bf16 storage, lr 1e-4, 20 AdamW steps: every trainable tensor must change."""
        model = self.make_model()
        batch = self.make_batch(model)
        att = self.attach(model, self.make_config(dtype=torch.bfloat16))
        start = {k: v.detach().clone() for k, v in att.adapter_tensors().items() if v.requires_grad}
        self.train(model, batch, steps=20, lr=1e-4)
        stuck = [k for k, v in att.adapter_tensors().items() if k in start and torch.equal(v.detach(), start[k])]
        assert not stuck, f"trainable tensors did not move (storage rounding or dead gradient): {stuck}"

    def test_gradients_finite_and_nonzero(self):
        model = self.make_model()
        batch = self.make_batch(model)
        att = self.attach(model)
        self.train(model, batch, steps=2, lr=self.train_lr)
        loss = self.loss_fn(model, batch, self.regression_target(model, batch))
        loss.backward()
        grads = [p.grad for p in att.trainable_parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), "missing or non-finite gradient"
        assert sum(float(g.norm()) for g in grads) > 0, "all adapter gradients are zero"

    def test_loss_drops(self):
        model = self.make_model()
        batch = self.make_batch(model)
        self.attach(model)
        losses = self.train(model, batch, steps=self.train_steps, lr=self.train_lr)
        drop = 1 - losses[-1] / losses[0]
        assert drop > self.min_loss_drop, f"loss dropped {drop:.1%} in {self.train_steps} steps ({losses[0]:.4g} -> {losses[-1]:.4g})"

    def test_save_load_into_fresh_model_is_exact(self, tmp_path: Path):
        model, batch, att = self.trained()
        trained_out = _outputs(model, self.run_model, batch)
        saved = {k: v.detach().clone() for k, v in att.adapter_tensors(persistent_only=True).items()}
        path = ll.save(model, tmp_path / "adapter.safetensors")
        fresh = self.make_model()
        (loaded,) = ll.load(fresh, path)
        got = loaded.adapter_tensors(persistent_only=True)
        assert sorted(got) == sorted(saved)
        for k, v in saved.items():
            assert torch.equal(got[k], v), f"{k} differs after reload"
        assert torch.equal(_outputs(fresh, self.run_model, batch), trained_out), "reloaded outputs differ"

    def test_save_detach_load_same_model_is_exact(self, tmp_path: Path):
        model, batch, _ = self.trained()
        trained_out = _outputs(model, self.run_model, batch)
        path = ll.save(model, tmp_path / "adapter.bin")
        ll.detach(model)
        ll.load(model, path)
        assert torch.equal(_outputs(model, self.run_model, batch), trained_out), "save -> detach -> load is not exact"

    def test_state_dict_has_full_path_adapter_keys(self):
        model = self.make_model()
        att = self.attach(model)
        keys = set(model.state_dict())
        for key in att.adapter_tensors():
            assert key in keys, f"{key} is not in model.state_dict()"

    def test_missing_and_unexpected_keys_fail_loudly(self, tmp_path: Path):
        from safetensors import safe_open
        from safetensors.torch import save_file

        model, batch, _ = self.trained()
        path = ll.save(model, tmp_path / "adapter.safetensors")
        with safe_open(str(path), framework="pt") as fh:
            meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
        dropped = sorted(tensors)[0]
        save_file({k: v for k, v in tensors.items() if k != dropped}, str(tmp_path / "missing.safetensors"), metadata=meta)
        save_file({**tensors, "layers.0.q_proj.lora_bogus": torch.zeros(1)}, str(tmp_path / "extra.safetensors"), metadata=meta)
        for name, key in (("missing", dropped), ("extra", "layers.0.q_proj.lora_bogus")):
            fresh = self.make_model()
            before = _outputs(fresh, self.run_model, batch)
            try:
                ll.load(fresh, tmp_path / f"{name}.safetensors")
            except ll.CheckpointMismatchError as err:
                assert key in str(err), f"the error does not name {key}: {err}"
            else:
                raise AssertionError(f"loading a checkpoint with a {name} key did not fail")
            assert not ll.attachments(fresh), "a failed load left an adapter attached"
            assert torch.equal(_outputs(fresh, self.run_model, batch), before), "a failed load changed the model"

    def test_detach_restores_outputs_and_requires_grad(self):
        model = self.make_model()
        batch = self.make_batch(model)
        next(model.parameters()).requires_grad_(False)  # a user-frozen tensor must stay frozen
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        base_out = _outputs(model, self.run_model, batch)
        base_keys = set(model.state_dict())
        self.attach(model)
        self.train(model, batch, steps=3, lr=self.train_lr)
        ll.detach(model)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert set(model.state_dict()) == base_keys, "detach left adapter tensors behind"
        assert torch.equal(_outputs(model, self.run_model, batch), base_out), "detach did not restore the outputs"
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "detach left hooks"

    def test_attach_twice_raises(self):
        model = self.make_model()
        self.attach(model)
        snapshot = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            self.attach(model)
        except ll.AlreadyAttachedError:
            pass
        else:
            raise AssertionError("a second attach on the same targets did not raise AlreadyAttachedError")
        after = model.state_dict()
        assert set(after) == set(snapshot) and all(torch.equal(after[k], v) for k, v in snapshot.items())

    def test_config_round_trips_through_dict(self):
        cfg = self.make_config()
        again = ll.LoraLiteConfig.from_dict(copy.deepcopy(cfg.to_dict()))
        assert again == cfg and type(again) is type(cfg)


def _frozen(t: torch.Tensor) -> Any:
    if t.device.type == "meta":
        return ("meta", tuple(t.shape), t.dtype)
    return t.detach().clone()


def _same(a: Any, b: Any) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else a == b


def snapshot_model(model: nn.Module, batch: Any = None, run: Any = None) -> dict[str, Any]:
    """Everything a refused or failed call must leave as it was.

    Every ``state_dict`` tensor (keys and values), every parameter's ``requires_grad``,
    every module's forward hooks, every ``lora_*`` attribute, the live attachments and,
    if ``batch`` is given, the outputs ``run(model, batch)`` (default ``model(batch)``).
    Compare two snapshots with :func:`assert_model_unchanged`.
    """
    snap = {
        "state": {k: _frozen(v) for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": {n: (tuple(m._forward_pre_hooks), tuple(m._forward_hooks)) for n, m in model.named_modules()},
        "lora_attrs": sorted(f"{n}.{k}" for n, m in model.named_modules() for k in vars(m)
                             if k.startswith(("lora_", "_lora_lite"))),
        "attachments": [id(a) for a in ll.attachments(model)],
    }
    if batch is not None:
        snap["outputs"] = _frozen(_outputs(model, run or (lambda m, b: m(b)), batch))
    return snap


def assert_model_unchanged(model: nn.Module, before: dict[str, Any], batch: Any = None, run: Any = None) -> None:
    """Assert ``model`` matches ``before`` (from :func:`snapshot_model`) bit for bit."""
    now = snapshot_model(model, batch if "outputs" in before else None, run)
    assert set(now["state"]) == set(before["state"]), (
        f"state_dict keys changed: added {sorted(set(now['state']) - set(before['state']))}, "
        f"removed {sorted(set(before['state']) - set(now['state']))}"
    )
    changed = [k for k, v in before["state"].items() if not _same(v, now["state"][k])]
    assert not changed, f"tensors changed: {changed}"
    assert now["requires_grad"] == before["requires_grad"], "requires_grad flags changed"
    assert now["hooks"] == before["hooks"], "forward hooks were added or removed"
    assert now["lora_attrs"] == before["lora_attrs"], f"lora attributes changed: {now['lora_attrs']}"
    assert now["attachments"] == before["attachments"], "the model's live attachments changed"
    if "outputs" in before:
        assert _same(now["outputs"], before["outputs"]), "the model's outputs changed"


__all__ = [
    "VariantConformance", "ToyTransformer", "ToyBlock", "IDENTITY_ATOL", "snapshot_model", "assert_model_unchanged",
]
