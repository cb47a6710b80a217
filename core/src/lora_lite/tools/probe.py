"""The probe: every variant on a real causal-LM architecture, end to end, in numbers.

Per variant, on a fresh base model: attach to the chosen targets, check identity at
init, check the hooks are live (perturb every trainable adapter tensor), train one fixed
LM batch for N steps, save, reload into another fresh base and compare logits. The
result is one :class:`ProbeRow` per variant; :func:`write_report` writes markdown, JSON
and a PNG of the loss curves. Needs transformers (``pip install 'lora-lite-core[probe]'``).
"""

from __future__ import annotations

import dataclasses

import json
import math
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .. import __version__
from .. import checks
from ..config import LoraLiteConfig
from ..errors import LoraLiteError, MissingDependencyError
from ..integrations.hf import EMBEDDED_MODEL
from ..plugins import get_variant

# default targets: layer 0 q_proj and v_proj, as in the original README's Qwen3-0.6B probe
DEFAULT_TARGET_NAMES = (r"\.q_proj$", r"\.v_proj$")
DEFAULT_LAYERS = (0,)
PROMPT = "LoRA-lite probe: Paris is the capital of France. The answer is"

COLUMNS = (
    ("variant", "variant"), ("targets", "targets"), ("trainable", "trainable"),
    ("identity_err", "identity err"), ("perturb_delta", "perturb delta"), ("loss0", "loss0"),
    ("lossN", "lossN"), ("drop_pct", "drop %"), ("grad_norm", "grad norm"),
    ("adapter_delta", "adapter delta"), ("reload_err", "reload err"), ("status", "status"),
)


@dataclass
class ProbeSettings:
    model: str
    variants: list[str]
    steps: int = 8
    lr: float = 5e-3
    r: int = 4
    alpha: float = 8.0
    seed: int = 0
    batch_size: int = 2
    seq_len: int = 32
    dtype: str = "float32"
    device: str = "cpu"
    target_names: tuple[str, ...] = DEFAULT_TARGET_NAMES
    layers: tuple[int, ...] | None = DEFAULT_LAYERS
    knobs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class ProbeRow:
    variant: str
    targets: int = 0
    trainable: int = 0
    identity_err: float = math.nan
    perturb_delta: float = math.nan
    loss0: float = math.nan
    lossN: float = math.nan
    drop_pct: float = math.nan
    grad_norm: float = math.nan
    adapter_delta: float = math.nan
    reload_err: float = math.nan
    failures: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    target_names: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def status(self) -> str:
        return "PASS" if self.passed else "FAIL"


def lm_batch(model: nn.Module, settings: ProbeSettings) -> tuple[dict[str, torch.Tensor], str]:
    """One fixed batch: the prompt through the model's tokenizer if it has one, else seeded token ids."""
    source, tok = settings.model, None
    if source != EMBEDDED_MODEL:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError):
            tok = None  # a model directory without tokenizer files: fall back to token ids
    vocab = model.get_input_embeddings().num_embeddings
    ids = tok([PROMPT] * settings.batch_size, return_tensors="pt").input_ids if tok is not None else None
    if ids is not None and ids.shape[1] >= 2 and int(ids.max()) < vocab:
        how = f"tokenizer of {source}: {PROMPT!r}"
    else:  # no tokenizer, or one that does not fit the model (transformers may build an empty one)
        g = torch.Generator().manual_seed(settings.seed + 1)
        ids = torch.randint(0, vocab, (settings.batch_size, settings.seq_len), generator=g)
        how = f"seeded random token ids {tuple(ids.shape)} (no tokenizer)"
    ids = ids.to(settings.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}, how


def config_for(variant: str, settings: ProbeSettings) -> LoraLiteConfig:
    kwargs = dict(
        variant=variant, r=settings.r, alpha=settings.alpha, dtype=settings.torch_dtype,
        target_names=settings.target_names, layers=settings.layers,
    )
    # a variant that gives r its own default gives it its own meaning (OFT: blocks per
    # layer, exclusive with a block size): keep that default unless --set names r
    config_class = get_variant(variant).config_class
    r_default = {f.name: f.default for f in dataclasses.fields(config_class)}["r"]
    if r_default != LoraLiteConfig.r:
        del kwargs["r"]
    return LoraLiteConfig(**{**kwargs, **settings.knobs.get(variant, {})})  # --set may override r, alpha, ...


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def _lm_objective(model: nn.Module, batch: dict[str, torch.Tensor]):
    return lambda m: m(**batch).loss


def subject_for(variant: str, make_base: Callable[[], nn.Module], batch: dict[str, torch.Tensor],
                settings: ProbeSettings, workdir: Path) -> checks.Subject:
    """The probe's causal LM, batch and settings as a :class:`lora_lite.checks.Subject`."""

    def make_model() -> nn.Module:
        return make_base().to(settings.device).eval()

    def make_config(**overrides: Any) -> LoraLiteConfig:
        cfg = config_for(variant, settings)
        return dataclasses.replace(cfg, **overrides)

    # data-calibrated variants (group_init) calibrate on the probe's own batch
    calibrated = get_variant(variant).hook("group_init") is not None
    return checks.Subject(
        variant=variant, make_model=make_model, make_batch=lambda model: batch, run=_logits,
        objective=_lm_objective, make_config=make_config,
        calibration=(lambda model: [batch]) if calibrated else (lambda model: None),
        train_steps=settings.steps, train_lr=settings.lr, min_loss_drop=0.0, seed=settings.seed, workdir=workdir,
    )


def probe_variant(
    variant: str,
    make_base: Callable[[], nn.Module],
    batch: dict[str, torch.Tensor],
    settings: ProbeSettings,
    workdir: Path,
    on_step: Callable[[], None] = lambda: None,
) -> ProbeRow:
    """Run :data:`lora_lite.checks.PROBE_CHECKS` on one variant; failures are collected in
    ``row.failures``, never raised."""
    row = ProbeRow(variant)
    start = time.perf_counter()
    subject = subject_for(variant, make_base, batch, settings, workdir)
    for check in checks.PROBE_CHECKS:  # training steps of the loss check drive the progress bar
        measured, failed = checks.run_checks(
            subject.with_(on_step=on_step) if check is checks.check_loss_drops else subject, [check])
        for key, value in measured.items():
            if hasattr(row, key):
                setattr(row, key, value)
        row.failures += [f"{name}: {msg}" for name, msg in failed.items()]
    row.seconds = time.perf_counter() - start
    return row


@dataclass
class ProbeReport:
    settings: ProbeSettings
    rows: list[ProbeRow]
    batch: str
    seconds: float

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)


def run_probe(
    settings: ProbeSettings,
    make_base: Callable[[], nn.Module],
    progress: Callable[[str], Any] | None = None,
    on_step: Callable[[], None] = lambda: None,
) -> ProbeReport:
    """Probe each variant of ``settings.variants`` on fresh bases from ``make_base``."""
    start = time.perf_counter()
    for name in settings.variants:
        get_variant(name)  # unknown variant: fail before any work, listing what is installed
    batch, how = lm_batch(make_base(), settings)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lora-lite-probe-") as tmp:
        for name in settings.variants:
            if progress is not None:
                progress(name)
            rows.append(probe_variant(name, make_base, batch, settings, Path(tmp), on_step))
    return ProbeReport(settings, rows, how, time.perf_counter() - start)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def table_rows(report: ProbeReport) -> tuple[list[str], list[list[str]]]:
    headers = [title for _, title in COLUMNS]
    return headers, [[_fmt(getattr(row, key)) for key, _ in COLUMNS] for row in report.rows]


def markdown_table(report: ProbeReport) -> str:
    headers, rows = table_rows(report)
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def failures_text(report: ProbeReport) -> str:
    return "\n".join(f"{r.variant}: {msg}" for r in report.rows for msg in r.failures)


def _settings_line(s: ProbeSettings) -> str:
    layers = "all" if s.layers is None else ",".join(map(str, s.layers))
    return (
        f"model `{s.model}`, {s.dtype} on {s.device}; targets {list(s.target_names)} in layers {layers}; "
        f"r={s.r} alpha={s.alpha}; {s.steps} AdamW steps at lr {s.lr} on one batch; seed {s.seed}"
        + (f"; knobs {s.knobs}" if s.knobs else "")
    )


def write_report(report: ProbeReport, out: Path) -> dict[str, Path]:
    """Write ``probe.md``, ``probe.json`` and ``loss_curves.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "probe.md", "json": out / "probe.json", "png": out / "loss_curves.png"}
    verdict = "all checks passed" if report.passed else "SOME CHECKS FAILED"
    md = [
        "# lora-lite probe", "",
        f"{_settings_line(report.settings)}.", "",
        f"Batch: {report.batch}.", "",
        markdown_table(report), "",
        f"Result: **{verdict}** in {report.seconds:.1f} s "
        f"(lora-lite-core {__version__}, torch {torch.__version__}, Python {platform.python_version()}).",
    ]
    if not report.passed:
        md += ["", "Failures:", "", *[f"- {line}" for line in failures_text(report).splitlines()]]
    paths["markdown"].write_text("\n".join(md) + "\n")
    data = {
        "passed": report.passed,
        "settings": {**asdict(report.settings), "target_names": list(report.settings.target_names)},
        "batch": report.batch,
        "seconds": report.seconds,
        "versions": {"lora-lite-core": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "variants": _variant_versions(r.variant for r in report.rows),
        "rows": [{**asdict(r), "passed": r.passed} for r in report.rows],
    }
    paths["json"].write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
    plot_losses(report, paths["png"])
    return paths


def _variant_versions(names: Iterable[str]) -> dict[str, dict[str, str | None]]:
    out = {}
    for name in names:
        try:
            info = get_variant(name)
            out[name] = {"distribution": info.distribution, "version": info.version, "module": info.module}
        except LoraLiteError:
            out[name] = {"distribution": None, "version": None, "module": None}
    return out


def plot_losses(report: ProbeReport, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise MissingDependencyError(
            "the probe's loss-curve PNG needs matplotlib: pip install 'lora-lite-core[probe]' (or matplotlib)."
        ) from err
    fig, ax = plt.subplots(figsize=(9 if len(report.rows) > 12 else 6, 4), dpi=120)
    for row in report.rows:
        if row.losses:
            ax.plot(range(len(row.losses)), row.losses, marker="o", ms=3,
                    label=f"{row.variant} ({row.status})", ls="-" if row.passed else "--")
    ax.set_xlabel("step (0 = before training)")
    ax.set_ylabel("LM loss on the fixed batch")
    ax.set_title(f"lora-lite probe: {report.settings.model}", fontsize=9)
    ax.grid(alpha=0.3)
    if any(r.losses for r in report.rows):
        many = len(report.rows) > 12  # 30+ variants: two small columns beside the axes
        ax.legend(fontsize=6 if many else None, ncol=2 if many else 1,
                  **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if many else {}))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
