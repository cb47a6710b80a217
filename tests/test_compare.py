"""`lora-lite compare`: runs, caches, stays fair, reports failures, and writes what it promises."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_lite as ll
from lora_lite.tools import compare as cmp

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_text_is_real_offline_and_split_without_overlap():
    train, reference = cmp.load_text(cmp.EMBEDDED_DATA)
    assert len(train) > 100_000 and len(reference) > 10_000
    assert "Return" in train and reference[:200] not in train  # forgetting is measured on unseen text
    ids = torch.arange(1000)
    s = cmp.split_tokens(ids, ids[:10])
    assert (len(s.train), len(s.val), len(s.test)) == (800, 100, 100)
    assert s.train[-1] < s.val[0] and s.val[-1] < s.test[0]


def test_local_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert cmp.load_text(str(tmp_path / "a.txt"))[0] == "hello world"
    assert cmp.load_text(str(tmp_path / "b.jsonl"))[0] == "one\n\ntwo"


@pytest.fixture
def broken_variant():
    """A third-party variant whose forward fails after attach: compare reports it, the others go on."""

    class Exploding:
        name = "exploding"

        def param_specs(d_in, d_out, cfg):
            return {"lora_s": ll.ParamSpec((d_out,), init="zeros")}

        def forward(layer, x, y):
            if layer.training:
                raise RuntimeError("boom in training")
            return y + layer.lora_s

    ll.register(Exploding)
    yield "exploding"
    ll.unregister("exploding")


def test_quick_run_writes_every_output_reuses_its_cache_and_reports_failures(tmp_path, broken_variant):
    settings = dict(variants=["lora", "vera", broken_variant], quick=True)
    first = cmp.compare(tmp_path, **settings)
    assert first.executed == 4 and first.cached == 0  # two learning rates each for lora and vera
    assert set(first.failures) == {"exploding"} and "boom in training" in first.failures["exploding"]
    board = {r["variant"]: r for r in first.leaderboard}
    assert set(board) == {"lora", "vera"}
    lora_lite_lrs = ll.get_variant("lora").lrs
    for row in board.values():
        assert {"variant", "params", "best_lr", "seeds", "eval_loss_mean", "eval_loss_std"} <= set(row)
        assert math.isfinite(row["eval_loss_mean"]) and row["seeds"] == 1
    assert board["lora"]["best_lr"] in lora_lite_lrs
    assert board["vera"]["params"] < board["lora"]["params"]
    # each variant sweeps its own declared grid: vera's starts higher than lora's
    assert {r["lr"] for r in first.runs if r["variant"] == "vera"} <= set(ll.get_variant("vera").lrs)
    assert min(ll.get_variant("vera").lrs) > min(lora_lite_lrs)
    for name in ("compare.json", "compare.md", "compare.csv", "loss_curves.png", "pareto.png", "lr_sweep.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    data = json.loads((tmp_path / "compare.json").read_text())
    assert [r["variant"] for r in data["leaderboard"]] == [r["variant"] for r in first.leaderboard]
    assert "FAILED" in (tmp_path / "compare.md").read_text()
    curve = first.runs[0]["curve"]
    assert len(curve) == 6 and all(math.isfinite(v) for v in curve)

    second = cmp.compare(tmp_path, **settings)
    assert second.executed == 0 and second.cached == 4
    assert second.leaderboard == first.leaderboard


def test_a_rerun_from_scratch_gives_identical_numbers(tmp_path):
    kw = dict(variants=["lora"], quick=True, lrs=(1e-3,))
    a = cmp.compare(tmp_path / "a", **kw).runs[0]
    b = cmp.compare(tmp_path / "b", **kw).runs[0]
    for key in ("curve", "val_loss", "test_loss", "test_acc", "forgetting", "params"):
        assert a[key] == b[key], key


def test_budget_matches_each_variants_size_knob(tmp_path):
    report = cmp.compare(tmp_path, variants=["lora", "vera", "ia3"], quick=True, lrs=(1e-3,), budget=20_000)
    board = {r["variant"]: r for r in report.leaderboard}
    # lora's count grows by 11,264 per rank on this model: r=2 is the closest to 20k
    assert board["lora"]["size"] == 2 and abs(board["lora"]["params"] - 20_000) < 11_264 / 2
    assert board["vera"]["size"] > 8  # vera's count grows slowly with r: a large r matches
    assert board["ia3"]["size"] is None  # size fixed by the layer shapes: run as it is


def test_seeds_give_mean_and_std_and_noise_marks(tmp_path):
    report = cmp.compare(tmp_path, variants=["lora", "dora"], quick=True, lrs=(1e-3,), seeds=2)
    assert report.settings.seeds == 1  # quick means one seed ...
    report = cmp.compare(tmp_path / "s", variants=["lora", "dora"], lrs=(1e-3,), seeds=3, steps=3, batch_size=2,
                         seq_len=16, eval_batches=1)
    top = report.leaderboard[0]
    for row in report.leaderboard:
        assert row["seeds"] == 3 and row["eval_loss_std"] > 0
        gap = row["eval_loss_mean"] - top["eval_loss_mean"]
        assert gap >= 0  # sorted by mean test loss
        assert row["within_noise"] == (gap <= row["eval_loss_std"] + top["eval_loss_std"])


def test_cli_quick_with_a_third_party_plugin(tmp_path):
    """The plugin template, registered as a third party would ship it, runs through the CLI."""
    script = (
        "import sys; sys.path.insert(0, {src!r})\n"
        "import lora_lite as ll, lora_lite_myvariant as m\n"
        "ll.register(m.MyVariant)\n"
        "from lora_lite.tools.cli import main\n"
        "sys.exit(main(['compare', '--quick', '--variants', 'myvariant,lora', '--lrs', '0.001', "
        "'--no-progress', '--out', {out!r}]))\n"
    ).format(src=str(ROOT / "plugins/_template/src"), out=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| myvariant |" in proc.stdout and "| lora |" in proc.stdout
    assert "2 run(s) executed" in proc.stdout


def test_unknown_variant_fails_before_any_run(tmp_path):
    with pytest.raises(ll.UnknownVariantError):
        cmp.compare(tmp_path, variants=["no_such_variant"], quick=True)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())
