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

from pathlib import Path
from typing import Any

import torch
from torch import nn

import lora_lite as ll
from lora_lite import checks
from lora_lite.checks import IDENTITY_ATOL

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


def _check_test(check: Any) -> Any:
    def test(self, tmp_path: Path) -> None:
        check(self.subject(tmp_path))

    test.__name__ = "test_" + checks.check_name(check)
    test.__doc__ = check.__doc__
    return test


class VariantConformance:
    """Subclass and set ``variant`` (and ``config_kwargs``) to run the contract on a variant.

    Every check of :data:`lora_lite.checks.CHECKS` becomes a test method
    (``check_identity_at_init`` -> ``test_identity_at_init``); :meth:`subject` is what
    they run on, built from the overridable methods below.
    """

    variant: str = ""
    config_kwargs: dict[str, Any] = {}
    seed: int = 0
    train_steps: int = 20
    train_lr: float = 1e-2
    min_loss_drop: float = 0.05
    merge_options: dict[str, Any] = {}  # merge(model, **merge_options) in the merge check

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
        """Data for ``group_init``: the kit's own batch for a data-calibrated variant (one
        with a ``group_init`` hook), ``None`` for weight-only variants."""
        return [self.make_batch(model)] if ll.get_variant(self.variant).hook("group_init") is not None else None

    def identity_atol(self, model: nn.Module) -> float:
        return IDENTITY_ATOL[next(model.parameters()).dtype]

    # -- what the checks run on ----------------------------------------------------
    def regression_target(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """A reachable target: the base output shifted by a smooth random function of it."""
        base = _outputs(model, self.run_model, batch)
        g = torch.Generator().manual_seed(self.seed + 2)
        mix = torch.randn(base.shape[-1], base.shape[-1], generator=g) / base.shape[-1] ** 0.5
        return base + 0.5 * torch.tanh(base.float() @ mix).to(base.dtype)

    def objective(self, model: nn.Module, batch: Any):
        target = self.regression_target(model, batch)
        return lambda m: self.loss_fn(m, batch, target)

    def subject(self, workdir: Path | None = None) -> checks.Subject:
        """This variant and these fixtures as a :class:`lora_lite.checks.Subject`."""
        return checks.Subject(
            variant=self.variant, make_model=self.make_model, make_batch=self.make_batch, run=self.run_model,
            objective=self.objective, make_config=self.make_config, calibration=self.calibration_data,
            train_steps=self.train_steps, train_lr=self.train_lr, min_loss_drop=self.min_loss_drop,
            seed=self.seed, workdir=workdir, identity_atol=self.identity_atol,
            merge_options=self.merge_options,
        )

    # helpers kept for plugin tests written against earlier releases
    def attach(self, model: nn.Module, cfg: ll.LoraLiteConfig | None = None) -> ll.Attachment:
        return self.subject().attach(model, cfg)

    def train(self, model: nn.Module, batch: Any, steps: int, lr: float) -> list[float]:
        return self.subject().train(model, batch, steps, lr)[0][:-1]

    def trained(self) -> tuple[nn.Module, Any, ll.Attachment]:
        return self.subject().trained()

    # -- the contract: one test per check -----------------------------------------
    for _check in checks.CHECKS:
        locals()["test_" + checks.check_name(_check)] = _check_test(_check)
    del _check


def parametrize_with_checks(variants: Any, checks_: Any = None) -> Any:
    """``pytest.mark.parametrize(("variant", "check"), ...)`` over every pair of ``variants``
    and checks (default: all of :data:`lora_lite.checks.CHECKS`), ids ``variant-check``::

        @parametrize_with_checks(["lora", "dora"])
        def test_contract(variant, check, tmp_path):
            check(MyKit(variant).subject(tmp_path))
    """
    import pytest

    chosen = tuple(checks.CHECKS if checks_ is None else checks_)
    pairs = [(v, c) for v in variants for c in chosen]
    return pytest.mark.parametrize(("variant", "check"), pairs,
                                   ids=[f"{v}-{checks.check_name(c)}" for v, c in pairs])


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
    "VariantConformance", "parametrize_with_checks", "ToyTransformer", "ToyBlock", "IDENTITY_ATOL", "snapshot_model", "assert_model_unchanged",
]
