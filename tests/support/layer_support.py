"""The variant x layer-kind support matrix, measured, and its markdown table.

Every cell runs one variant on one layer kind and either proves the contract (attach,
identity at init, a finite non-zero gradient on every trainable adapter tensor, loss drops,
save/load exact into a fresh model and after detach) or records the typed
``LoraLiteError`` the variant raised at attach, with the model left untouched. Anything
else (a crash, a failed check) is an error, never a table entry. ``tests/test_layers_matrix.py``
runs the cells; ``docs/layers.md`` holds the rendered table and a test fails when it is
stale. Regenerate it with::

    python -m tests.support.layer_support --write
"""

from __future__ import annotations

import functools
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import lora_lite as ll

from .models import bnb_qwen3, tiny_gpt2, tiny_qwen3
from lora_lite import checks
from lora_lite.checks import same_bits

from .kits import Qwen3Models, kit_for

# column -> (architecture, bnb setting / layer targeted by name, or None)
KINDS = {
    "Linear": ("qwen3", None),
    "bnb 4-bit nf4": ("qwen3", "bnb-nf4"),
    "bnb 4-bit fp4": ("qwen3", "bnb-fp4"),
    "bnb 8-bit": ("qwen3", "bnb-int8"),
    "Conv1D (GPT-2)": ("gpt2", None),
    "Embedding": ("qwen3", "embed"),
    "Conv1d": ("conv", "conv1d"),
    "Conv2d": ("conv", "conv2d"),
}
# kinds only target_names selects (not linear-like): the module each column adapts
BY_NAME = {"embed": (r"\.embed_tokens$",), "conv1d": (r"^seq$",), "conv2d": (r"^conv$", r"^mid$")}
# rows beyond one per installed variant: opt-in knobs whose behaviour differs by layer kind
EXTRA_ROWS = {"pissa": [{"quantized": "requantize"}], "lora": [{"init": "olora"}]}

DOC = Path(__file__).resolve().parents[2] / "docs" / "layers.md"
BEGIN, END = "<!-- support-table:begin -->", "<!-- support-table:end -->"


class ConvNet(torch.nn.Module):
    """Two Conv2d, one Conv1d over the flattened feature map, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.mid = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.seq = torch.nn.Conv1d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.mid(torch.relu(self.conv(x))))
        return self.head(torch.relu(self.seq(h.flatten(2))).mean(-1))


def make_model(kind: str, seed: int = 0) -> torch.nn.Module:
    arch, setting = KINDS[kind]
    if arch == "gpt2":
        return tiny_gpt2(seed)
    if arch == "conv":
        torch.manual_seed(seed)
        return ConvNet().eval()
    return bnb_qwen3(setting, seed) if setting and setting.startswith("bnb") else tiny_qwen3(seed)


class LayerKindKit(Qwen3Models):
    """The conformance kit on a model whose target layers are of one kind."""

    kind = "Linear"

    def make_model(self):
        return make_model(self.kind, self.seed)

    def make_config(self, **overrides):
        names = BY_NAME.get(KINDS[self.kind][1])
        return super().make_config(**({"target_names": names, "exclude_names": ()} if names else {}), **overrides)

    def make_batch(self, model):
        if KINDS[self.kind][0] == "conv":
            return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(self.seed + 1))
        return super().make_batch(model)

    def run_model(self, model, batch):
        return model(batch) if KINDS[self.kind][0] == "conv" else super().run_model(model, batch)

    def objective(self, model, batch):
        if KINDS[self.kind][1] == "embed":  # an embedding adapter moves logits little: train on the LM loss
            return lambda m: m(**batch, labels=batch["input_ids"]).loss
        return super().objective(model, batch)


@dataclass(frozen=True)
class Cell:
    status: str  # "yes", "approx" (identity up to requantization) or "refused"
    detail: str = ""  # the error type for "refused", the measured identity error for "approx"


def rows() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for info in ll.list_variants():
        out.append((info.name, {}))
        out += [(info.name, knobs) for knobs in EXTRA_ROWS.get(info.name, [])]
    return out


def row_label(variant: str, knobs: dict[str, Any]) -> str:
    return variant + "".join(f" ({k}={v!r})" for k, v in sorted(knobs.items()))


def same_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return set(now) == set(state) and all(same_bits(now[k], v) for k, v in state.items())


def _outputs(kit, model, batch) -> torch.Tensor:
    with torch.no_grad():
        return kit.run_model(model, batch).detach().clone()


def _quantization_error(kit, batch) -> float:
    """Output error of the quantized base model against its full-precision original."""
    fp = make_model("Linear", kit.seed)
    return (_outputs(kit, kit.make_model(), batch) - _outputs(kit, fp, batch)).abs().max().item()


# after attach and identity (measured above, with the requantized case): the contract a "yes" cell proves
CELL_CHECKS = (checks.check_gradients_finite_and_nonzero, checks.check_loss_drops,
               checks.check_save_load_into_fresh_model_is_exact, checks.check_save_detach_load_same_model_is_exact)


@functools.cache
def measure(variant: str, knobs_items: tuple[tuple[str, Any], ...], kind: str) -> Cell:
    """Run one cell; raise AssertionError (or whatever broke) if the variant attaches but
    does not meet the contract on this kind."""
    kit = kit_for(variant, LayerKindKit)
    kit.kind = kind
    kit.config_kwargs = {**kit.config_kwargs, **dict(knobs_items)}
    if KINDS[kind][1] == "embed":
        kit.train_lr = 5e-2  # one row of A per token, few tokens per step: the LM loss needs a larger rate
    model = kit.make_model()
    batch = kit.make_batch(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = _outputs(kit, model, batch)
    try:
        kit.attach(model)
    except ll.LoraLiteError as err:
        assert not ll.attachments(model), "a refused attach left an adapter attached"
        assert same_state(model, before), "a refused attach changed the model"
        return Cell("refused", type(err).__name__)
    err = (_outputs(kit, model, batch) - base).abs().max().item()
    status, detail = "yes", ""
    if err > kit.identity_atol(model):
        requantized = [m for m in model.modules() if hasattr(m, "lora_requant_error")]
        assert requantized, f"identity error {err:.3e} at init"
        bound = _quantization_error(kit, batch)
        # W_res is requantized once more: its error is of the order of the base's own
        assert err <= 2 * bound, f"requantized identity error {err:.3e} exceeds 2x the model's quantization error {bound:.3e}"
        status, detail = "approx", f"{err:.1e}"
    with tempfile.TemporaryDirectory() as tmp:
        subject = kit.subject(Path(tmp))
        for check in CELL_CHECKS:
            check(subject)
    return Cell(status, detail)


def render(cells: dict[tuple[str, str], Cell]) -> str:
    """Markdown table: rows are variants (and opt-in knob rows), columns layer kinds."""
    lines = ["| variant | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    for variant, knobs in rows():
        label = row_label(variant, knobs)
        shown = []
        for kind in KINDS:
            cell = cells[(label, kind)]
            shown.append({"yes": "yes", "approx": "≈ (requantized)", "refused": f"refused: `{cell.detail}`"}[cell.status])
        lines.append(f"| {label} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def measure_all() -> dict[tuple[str, str], Cell]:
    return {
        (row_label(v, knobs), kind): measure(v, tuple(sorted(knobs.items())), kind)
        for v, knobs in rows() for kind in KINDS
    }


def committed_table() -> str:
    text = DOC.read_text()
    return text[text.index(BEGIN) + len(BEGIN): text.index(END)].strip()


def write_table(table: str) -> None:
    text = DOC.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + table + "\n" + text[end:])


if __name__ == "__main__":
    table = render(measure_all())
    if "--write" in sys.argv:
        write_table(table)
        print(f"wrote the support table into {DOC}")
    else:
        print(table)
