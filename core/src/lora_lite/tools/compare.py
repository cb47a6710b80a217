"""``lora-lite compare``: a fair comparison of adapter variants on one model and one text.

Fairness, as the adapter literature found it missing (most papers do not tune the learning
rate per method; unequal parameter budgets; single-seed gaps within run-to-run noise):

- every variant gets its own learning-rate sweep (``--lrs``, default: the grid the plugin
  declares as ``lrs``); the best rate is picked on a validation split, then rerun over
  ``--seeds`` seeds and scored on a separate test split;
- ``--budget N`` sets each variant's size knob (declared by the plugin as ``size_knob``)
  to the value whose trainable-parameter count is closest to N, and reports the count;
- the leaderboard gives mean +- std over seeds and marks variants within seed noise of
  the best.

Every run is cached on disk (``<out>/runs/<hash of its full configuration>.json``), so a
rerun skips finished runs and gives identical results, Ctrl-C loses at most the run in
flight, and a failing variant is reported while the others go on.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import hashlib
import importlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import __version__
from ..config import LoraLiteConfig
from ..errors import ConfigError, LoraLiteError, MissingDependencyError
from ..plugins import get_variant, list_variants
from ..runtime import attach, regularization_loss
from ..runtime import step as ll_step

# the default text: documentation that ships with Python itself (module docstrings of the
# standard library): real prose and code nobody here wrote, the same offline everywhere
TRAIN_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal", "email",
    "functools", "heapq", "http.client", "inspect", "itertools", "json", "logging", "pathlib", "pickle", "re",
    "sched", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap",
    "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)
# text never trained on, to measure forgetting
REFERENCE_MODULES = ("ast", "calendar", "difflib", "fractions", "gzip", "hashlib", "tempfile", "traceback")
EMBEDDED_DATA = "embedded:python-docs"


@dataclass
class CompareSettings:
    model: str = "embedded:qwen3-tiny"
    data: str = EMBEDDED_DATA
    variants: list[str] | None = None
    targets: tuple[str, ...] = ()  # target_names regexes; () = every linear-like layer (lm_head excluded)
    steps: int = 60
    seeds: int = 3
    lrs: tuple[float, ...] | None = None  # None: each variant's declared grid
    budget: int | None = None
    device: str = "cpu"
    batch_size: int = 8
    seq_len: int = 64
    eval_batches: int = 4
    r: int = 8
    quick: bool = False

    def __post_init__(self) -> None:
        if self.quick:  # CI-sized: under a minute on 2 CPU cores
            self.steps, self.seeds, self.batch_size, self.seq_len, self.eval_batches = 6, 1, 4, 32, 1
        if self.steps < 1 or self.seeds < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise ConfigError("compare needs steps >= 1, seeds >= 1, batch_size >= 1 and seq_len >= 2.")


# -- data ----------------------------------------------------------------------------------


def _docstrings(modules: tuple[str, ...]) -> str:
    parts = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        parts.append((mod.__doc__ or "").strip())
        for attr, obj in sorted(vars(mod).items()):
            doc = getattr(obj, "__doc__", None) if getattr(obj, "__module__", None) == name else None
            if isinstance(doc, str) and len(doc) > 80:
                parts.append(doc.strip())
    return "\n\n".join(p for p in parts if p)


def load_text(data: str) -> tuple[str, str]:
    """``(training text, reference text)``. ``data``: the embedded default, a local ``.txt`` or
    ``.jsonl`` (a ``text`` field per line), or a ``datasets`` name (``datasets`` installed)."""
    reference = _docstrings(REFERENCE_MODULES)
    if data == EMBEDDED_DATA:
        return _docstrings(TRAIN_MODULES), reference
    path = Path(data).expanduser()
    if path.is_file():
        if path.suffix == ".jsonl":
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            return "\n\n".join(str(rec.get("text", "")) for rec in lines), reference
        return path.read_text(), reference
    try:
        import datasets
    except ImportError as err:
        raise MissingDependencyError(
            f"--data {data!r} is no local file; a datasets name needs `pip install datasets`."
        ) from err
    split = datasets.load_dataset(data, split="train")
    return "\n\n".join(str(t) for t in split["text"][:20000]), reference


def tokenize(text: str, model: nn.Module, source: str) -> torch.Tensor:
    """Token ids: the model's tokenizer when it has one, else UTF-8 bytes (the embedded model's
    vocabulary is larger than 256)."""
    vocab = model.get_input_embeddings().num_embeddings
    if not source.startswith("embedded:"):
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
            ids = torch.tensor(tok(text).input_ids)
            if len(ids) and int(ids.max()) < vocab:
                return ids
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long) % vocab


@dataclass
class Splits:
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    reference: torch.Tensor


def split_tokens(ids: torch.Tensor, reference: torch.Tensor) -> Splits:
    n = len(ids)
    return Splits(ids[: int(0.8 * n)], ids[int(0.8 * n): int(0.9 * n)], ids[int(0.9 * n):], reference)


def _windows(ids: torch.Tensor, count: int, seq: int, start: int = 0, stride: int | None = None) -> torch.Tensor:
    stride = stride or seq
    need = start + (count - 1) * stride + seq
    if need > len(ids):
        raise ConfigError(f"the text has {len(ids)} tokens in a split, too few for {count} windows of {seq}.")
    return torch.stack([ids[start + i * stride: start + i * stride + seq] for i in range(count)])


# -- one run -------------------------------------------------------------------------------


def _config(variant: str, settings: CompareSettings, size: int | None) -> LoraLiteConfig:
    info = get_variant(variant)
    fields = {f.name: f.default for f in dataclasses.fields(info.config_class)}
    kwargs: dict[str, Any] = {"variant": variant, "target_names": settings.targets}
    if "total_step" in fields and fields["total_step"] is None:  # a schedule's length (AdaLoRA): the run's steps
        kwargs["total_step"] = settings.steps
    knob = info.size_knob
    value = size if size is not None else (settings.r if knob == "r" and fields["r"] == LoraLiteConfig.r else None)
    if knob is not None and value is not None:
        kwargs[knob] = value
        if knob == "r":
            kwargs["alpha"] = 2.0 * value  # keep alpha / r fixed as the rank moves
    return LoraLiteConfig(**kwargs)


def _eval(model: nn.Module, windows: torch.Tensor, batch_size: int, device: str) -> tuple[float, float]:
    """Mean next-token loss and accuracy over ``windows``."""
    losses, correct, count = [], 0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            ids = windows[i: i + batch_size].to(device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            target = ids[:, 1:]
            losses.append(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)).item())
            correct += int((logits.argmax(-1) == target).sum())
            count += target.numel()
    return statistics.fmean(losses), correct / count


class _saved_bytes(contextlib.AbstractContextManager):
    """Bytes of the distinct tensors autograd saves for backward inside the block."""

    total = 0

    def __enter__(self):
        self.total, self._seen = 0, set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = (t.untyped_storage().data_ptr(), t.dtype)
            if key not in self._seen:
                self._seen.add(key)
                self.total += t.untyped_storage().nbytes()
            return t

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def run_one(base: nn.Module, splits: Splits, settings: CompareSettings, variant: str, lr: float, seed: int,
            size: int | None) -> dict[str, Any]:
    """Train one adapter; return its metrics (JSON-safe)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base).to(settings.device)
    bs, seq = settings.batch_size, settings.seq_len
    val = _windows(splits.val, settings.eval_batches * bs, seq)
    test = _windows(splits.test, settings.eval_batches * bs, seq)
    ref = _windows(splits.reference, settings.eval_batches * bs, seq)
    ref_before, _ = _eval(model, ref, bs, settings.device)
    cfg = _config(variant, settings, size)
    calibration = None
    if get_variant(variant).hook("group_init") is not None:
        calibration = [{"input_ids": _windows(splits.train, bs, seq).to(settings.device)}]
    att = attach(model, cfg, calibration_data=calibration)
    params = [p for p in att.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(splits.train) - seq, (settings.steps, bs), generator=g)
    curve, times, meter = [], [], _saved_bytes()
    cuda = settings.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model.train()
    for step in range(settings.steps):
        ids = torch.stack([splits.train[s: s + seq] for s in starts[step].tolist()]).to(settings.device)
        t0 = time.perf_counter()
        with meter if step == 0 else contextlib.nullcontext():
            lm_loss = model(input_ids=ids, labels=ids).loss
            loss = lm_loss + regularization_loss(model)  # variants' own terms (AdaLoRA's orthogonality)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ll_step(model)  # per-step hooks (AdaLoRA's rank schedule); nothing for most variants
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        curve.append(lm_loss.item())
        if not math.isfinite(curve[-1]):
            break
    val_loss, _ = _eval(model, val, bs, settings.device)
    test_loss, test_acc = _eval(model, test, bs, settings.device)
    ref_after, _ = _eval(model, ref, bs, settings.device)
    # CUDA: the allocator's peak. CPU (no allocator statistics): what training holds beyond the
    # frozen weights, i.e. tensors autograd saved for backward plus adapter parameters, their
    # gradients and AdamW's two moments
    state = sum(p.numel() * p.element_size() for p in params) * 4
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else (meter.total + state) / 2**20
    return {
        "variant": variant, "lr": lr, "seed": seed, "size": getattr(cfg, get_variant(variant).size_knob or "", None),
        "params": sum(p.numel() for p in params), "curve": curve, "val_loss": val_loss, "test_loss": test_loss,
        "test_acc": test_acc, "forgetting": ref_after - ref_before, "step_time": statistics.median(times),
        "peak_mem_mib": peak, "config": cfg.to_dict(),
    }


# -- the grid ------------------------------------------------------------------------------


def _size_for_budget(base: nn.Module, settings: CompareSettings, variant: str) -> int | None:
    """The size-knob value whose trainable-parameter count is closest to the budget (``None``
    for a variant whose size the layer shapes fix: it runs at that size, reported as is)."""
    if get_variant(variant).size_knob is None:
        return None

    def count(v: int) -> int | None:
        try:
            return len_params(attach(copy.deepcopy(base), _config(variant, settings, v)))
        except LoraLiteError:
            return None

    best, best_gap, v = None, math.inf, 1
    while v <= 4096:
        n = count(v)
        if n is not None:
            gap = abs(n - settings.budget)
            if gap < best_gap:
                best, best_gap = v, gap
            if n > settings.budget:
                break
        v = v + 1 if v < 16 else v * 2 if n is None else int(v * 1.25) + 1
    if best is None:
        raise ConfigError(f"no value of {variant}'s size knob gives a valid adapter near {settings.budget} parameters.")
    return best


def len_params(att) -> int:
    return sum(p.numel() for p in att.trainable_parameters())


def _key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass
class CompareReport:
    settings: CompareSettings
    runs: list[dict[str, Any]]
    leaderboard: list[dict[str, Any]]
    failures: dict[str, str]
    executed: int
    cached: int
    seconds: float
    data_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def run_compare(settings: CompareSettings, out: Path, progress: Callable[[str, int], Any] | None = None,
                make_base: Callable[[], nn.Module] | None = None) -> CompareReport:
    """Run (or reuse from ``out/runs``) every run of the grid and build the leaderboard."""
    from ..integrations.hf import load_causal_lm

    start = time.perf_counter()
    base = make_base() if make_base is not None else load_causal_lm(settings.model, torch.float32, 0)
    train_text, ref_text = load_text(settings.data)
    ids = tokenize(train_text, base, settings.model)
    splits = split_tokens(ids, tokenize(ref_text, base, settings.model))
    variants = settings.variants or [v.name for v in list_variants()]
    for name in variants:
        get_variant(name)  # unknown names fail before any work
    runs_dir = Path(out) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    common = {"model": settings.model, "data": hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16],
              "targets": settings.targets, "steps": settings.steps, "batch_size": settings.batch_size,
              "seq_len": settings.seq_len, "eval_batches": settings.eval_batches, "device": settings.device,
              "core": __version__}
    runs, failures, counts = [], {}, {"executed": 0, "cached": 0}

    def one(variant: str, lr: float, seed: int, size: int | None) -> dict[str, Any]:
        info = get_variant(variant)
        key = _key({**common, "variant": variant, "plugin": [info.distribution, info.version], "lr": lr,
                    "seed": seed, "size": size, "r": settings.r})
        path = runs_dir / f"{key}.json"
        if path.is_file():
            counts["cached"] += 1
            return json.loads(path.read_text())
        result = run_one(base, splits, settings, variant, lr, seed, size)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, path)  # a run is on disk whole or not at all
        counts["executed"] += 1
        return result

    for variant in variants:
        try:
            size = _size_for_budget(base, settings, variant) if settings.budget else None
            lrs = settings.lrs or get_variant(variant).lrs
            if settings.quick and settings.lrs is None:
                lrs = lrs[1:3] or lrs
            sweep = []
            for lr in lrs:
                if progress:
                    progress(f"{variant} lr={lr:g}", 1)
                sweep.append(one(variant, lr, 0, size))
            finite = [r for r in sweep if math.isfinite(r["val_loss"])]
            if not finite:
                raise ConfigError(f"every learning rate of {list(lrs)} diverged")
            best = min(finite, key=lambda r: r["val_loss"])
            seeded = [best]
            for seed in range(1, settings.seeds):
                if progress:
                    progress(f"{variant} seed {seed}", 1)
                seeded.append(one(variant, best["lr"], seed, size))
            runs += sweep + seeded[1:]
        except KeyboardInterrupt:
            raise
        except Exception as err:  # a failing variant is reported; the others go on
            failures[variant] = f"{type(err).__name__}: {err}"
    board = leaderboard(runs, settings.seeds)
    return CompareReport(settings, runs, board, failures, counts["executed"], counts["cached"],
                         time.perf_counter() - start, len(ids))


def leaderboard(runs: list[dict[str, Any]], seeds: int) -> list[dict[str, Any]]:
    """One row per variant: its best LR (on the validation split at seed 0) rerun over the
    seeds, scored on the test split; sorted by mean test loss; ``within_noise`` marks rows
    whose mean is within the two rows' combined std of the best."""
    rows = []
    for variant in sorted({r["variant"] for r in runs}):
        mine = [r for r in runs if r["variant"] == variant]
        sweep = [r for r in mine if r["seed"] == 0]
        best_lr = min(sweep, key=lambda r: r["val_loss"])["lr"]
        chosen = [r for r in mine if r["lr"] == best_lr]
        losses = [r["test_loss"] for r in chosen]
        swept = sorted(r["lr"] for r in sweep)
        rows.append({
            "variant": variant, "params": chosen[0]["params"], "size": chosen[0]["size"], "best_lr": best_lr,
            # the best rate sits at an end of the grid: a wider sweep might find a better one
            "lr_at_edge": len(swept) > 2 and best_lr in (swept[0], swept[-1]),
            "seeds": len(chosen), "eval_loss_mean": statistics.fmean(losses),
            "eval_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "eval_acc_mean": statistics.fmean(r["test_acc"] for r in chosen),
            "forgetting_mean": statistics.fmean(r["forgetting"] for r in chosen),
            "step_time_ms": 1000 * statistics.median(r["step_time"] for r in chosen),
            "peak_mem_mib": max(r["peak_mem_mib"] for r in chosen),
        })
    rows.sort(key=lambda r: r["eval_loss_mean"])
    if rows:
        top = rows[0]
        for r in rows:
            r["within_noise"] = abs(r["eval_loss_mean"] - top["eval_loss_mean"]) <= r["eval_loss_std"] + top["eval_loss_std"]
    return rows


# -- outputs -------------------------------------------------------------------------------

COLUMNS = ("variant", "params", "best_lr", "lr_at_edge", "seeds", "eval_loss_mean", "eval_loss_std", "eval_acc_mean",
           "forgetting_mean", "step_time_ms", "peak_mem_mib", "within_noise")


def markdown(report: CompareReport) -> str:
    s = report.settings
    lines = [
        "| # | variant | params | best lr | test loss (mean +- std) | next-token acc | forgetting | step ms | "
        "peak MiB |", "|---:|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(report.leaderboard, 1):
        mark = " (within noise of #1)" if r["within_noise"] and i > 1 else ""
        lines.append(
            f"| {i} | {r['variant']} | {r['params']:,} | {r['best_lr']:g}{' (edge)' if r['lr_at_edge'] else ''} | {r['eval_loss_mean']:.4f} +- "
            f"{r['eval_loss_std']:.4f}{mark} | {r['eval_acc_mean']:.3f} | {r['forgetting_mean']:+.4f} | "
            f"{r['step_time_ms']:.1f} | {r['peak_mem_mib']:.0f} |"
        )
    for name, err in report.failures.items():
        lines.append(f"| - | {name} | - | - | FAILED: {err[:120]} | - | - | - | - |")
    head = (f"Model `{s.model}`, data `{s.data}` ({report.data_tokens:,} tokens: 80/10/10 train/validation/test), "
            f"targets {list(s.targets) or 'every linear layer'}, {s.steps} AdamW steps of {s.batch_size} x "
            f"{s.seq_len} tokens, {s.seeds} seed(s) at each variant's best LR (picked on validation), "
            f"budget {s.budget or 'none'}, on {s.device}. (edge): the best rate is an end of the variant's grid; "
            f"widen --lrs to be sure.")
    return head + "\n\n" + "\n".join(lines) + "\n"


def write_report(report: CompareReport, out: Path) -> dict[str, Path]:
    out = Path(out)
    paths = {"json": out / "compare.json", "markdown": out / "compare.md", "csv": out / "compare.csv"}
    data = {"settings": asdict(report.settings), "leaderboard": report.leaderboard, "failures": report.failures,
            "runs": report.runs, "executed": report.executed, "cached": report.cached,
            "versions": {"lora-lite-core": __version__, "torch": torch.__version__}}
    paths["json"].write_text(json.dumps(data, indent=2, default=str) + "\n")
    paths["markdown"].write_text("# lora-lite compare\n\n" + markdown(report))
    with open(paths["csv"], "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(report.leaderboard)
    paths.update(plot(report, out))
    return paths


def plot(report: CompareReport, out: Path) -> dict[str, Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise MissingDependencyError("compare's plots need matplotlib: pip install 'lora-lite-core[probe]'.") from err
    paths = {"curves": out / "loss_curves.png", "pareto": out / "pareto.png", "lr": out / "lr_sweep.png"}
    best = {r["variant"]: r["best_lr"] for r in report.leaderboard}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r in report.runs:
        if r["seed"] == 0 and best.get(r["variant"]) == r["lr"]:
            ax.plot(r["curve"], label=r["variant"], lw=1.2)
    ax.set(xlabel="step", ylabel="training loss", title="training curves at each variant's best LR (seed 0)")
    ax.grid(alpha=0.3), ax.legend(fontsize=7, ncol=2)
    fig.tight_layout(), fig.savefig(paths["curves"]), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for r in report.leaderboard:
        ax.errorbar(r["params"], r["eval_loss_mean"], yerr=r["eval_loss_std"], fmt="o", capsize=3)
        ax.annotate(r["variant"], (r["params"], r["eval_loss_mean"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters", ylabel="held-out loss (mean +- std over seeds)", title="loss vs size")
    ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(paths["pareto"]), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for variant in sorted(best):
        sweep = sorted((r["lr"], r["val_loss"]) for r in report.runs if r["variant"] == variant and r["seed"] == 0)
        ax.plot([a for a, _ in sweep], [b for _, b in sweep], marker="o", ms=3, label=variant)
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel="validation loss (seed 0)", title="learning-rate sweep per variant")
    ax.grid(alpha=0.3), ax.legend(fontsize=7, ncol=2)
    fig.tight_layout(), fig.savefig(paths["lr"]), plt.close(fig)
    return paths


# -- CLI -----------------------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def add_cli_commands(sub) -> None:
    p = sub.add_parser("compare", help="fair comparison of variants: LR sweep per variant, seeds, budget, leaderboard")
    p.add_argument("--model", default=None, help="hub id or local path (default: the embedded Qwen3-architecture model)")
    p.add_argument("--data", default=EMBEDDED_DATA,
                   help="local .txt/.jsonl, a datasets name, or the embedded Python documentation (default)")
    p.add_argument("--variants", default=None, help="comma-separated (default: every installed variant)")
    p.add_argument("--targets", default=None, help="comma-separated target_names regexes (default: every linear layer)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lrs", type=_floats, default=None, help="comma-separated learning rates for every variant "
                   "(default: each variant's own declared grid)")
    p.add_argument("--budget", type=int, default=None, help="match each variant's size knob to this many trainable parameters")
    p.add_argument("--r", type=int, default=8, help="rank for variants whose size knob is r (without --budget)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="CI-sized: 6 steps, 1 seed, 2 learning rates, short windows")
    p.add_argument("--out", type=Path, default=Path("compare-out"))
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args) -> int:
    from ..integrations.hf import EMBEDDED_MODEL

    settings = CompareSettings(
        model=args.model or EMBEDDED_MODEL, data=args.data,
        variants=args.variants.split(",") if args.variants else None,
        targets=tuple(args.targets.split(",")) if args.targets else (), steps=args.steps, seeds=args.seeds,
        lrs=args.lrs, budget=args.budget, device=args.device, r=args.r, quick=args.quick,
    )
    bar = _progress(settings, args.no_progress)
    try:
        report = run_compare(settings, args.out, progress=lambda what, n: (bar.set_description(what), bar.update(n)))
    finally:
        bar.close()
    paths = write_report(report, args.out)
    print(markdown(report))
    print(f"{report.executed} run(s) executed, {report.cached} reused from {args.out / 'runs'}; "
          f"{report.seconds:.1f} s. Wrote " + ", ".join(str(p) for p in paths.values()))
    return 0 if not report.failures else 1


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_description(self, what: str) -> None: ...
    def close(self) -> None: ...


def _progress(settings: CompareSettings, disable: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the probe extra
        return _NoBar()
    n = len(settings.variants or list_variants())
    per = (len(settings.lrs) if settings.lrs else 2 if settings.quick else 4) + settings.seeds - 1
    return tqdm(total=n * per, unit="run", file=sys.stderr, disable=True if disable else None, leave=False)


def compare(out: str | Path = "compare-out", **settings: Any) -> CompareReport:
    """Python entry point: ``compare("out", variants=["lora", "dora"], quick=True)`` runs the
    grid (reusing cached runs in ``out/runs``), writes the reports to ``out`` and returns them."""
    report = run_compare(CompareSettings(**settings), Path(out))
    write_report(report, Path(out))
    return report


__all__ = ["CompareReport", "CompareSettings", "add_cli_commands", "compare", "leaderboard", "run_compare",
           "write_report"]
