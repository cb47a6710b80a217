"""Keep bench/ from rotting: run it in quick mode with one repeat and check the JSON's
shape and the trainable-parameter equality with PEFT. Timings are never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_writes_results_with_equal_param_counts(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--repeats", "1", "--variants", "lora,delora,ia3",
           "--skip", "compile,pissa", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert {"machine", "models", "phases", "layer", "attach", "memory", "merge", "compile", "skipped",
            "variants"} <= set(res)
    assert res["variants"] == ["lora", "delora", "ia3"]
    assert (tmp_path / "results.md").read_text().startswith("# lora-lite benchmark")
    # 3 variants x 2 target sets + the bf16 quickstart row; IA3 on all linears is two
    # attachments (ia3 + ia3_ff on down_proj), as PEFT's feedforward_modules
    assert len(res["models"]) == 7
    for row in res["models"]:
        assert row["trainable"]["lite"] == row["trainable"]["peft"] > 0, row
        for kind in ("train", "infer"):
            assert set(row[kind]["median_s"]) == {"base", "peft", "lite"}
            assert row[kind]["lite_over_peft"] > 0
    assert {(tuple(r["x"]), r["mode"]) for r in res["layer"]} == {
        (x, mode) for x in ((4, 128, 64), (4, 128, 512), (1, 1, 64), (1, 1, 512)) for mode in ("no_grad", "grad")}
    assert [r["targets"] for r in res["attach"]] == ["qv", "all"]
    assert res["adapters"]["mixed_over_loop"] > 0 and res["adapters"]["inactive_over_alone"] > 0
    for row in res["phases"]:  # forward, backward and optimizer of one lora step, each > 0 for an adapter
        assert set(row["median_ms"]) == {"forward", "backward", "optimizer"}
        assert all(row["median_ms"]["forward"][who] > 0 for who in ("base", "peft", "lite"))
    for row in res["memory"]:
        # the adapter adds tensors on top of the frozen base, never fewer
        assert row["peak_bytes"]["lite"] > row["peak_bytes"]["base"] > 0
    assert [r["variant"] for r in res["merge"]] == ["lora", "delora", "ia3"]
    for row in res["merge"]:  # both libraries merged and the merged models ran
        assert row["merge_ms"]["lite"] > 0 and row["merge_ms"]["peft"] > 0, row
        assert set(row["infer_ms"]) == {"base", "lite", "peft"} and row["lite_merged_over_base"] > 0


def test_gpu_script_dry_run_on_cpu(tmp_path):
    """bench/gpu.py --dry: every section runs on the CPU at tiny shapes, so the GPU script
    cannot rot between the runs on a lent GPU. Contract failures are real failures."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    cmd = [sys.executable, "-m", "bench.gpu", "--dry", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["dry"] is True and res["device"] == "cpu"
    failed = [(r["variant"], r["dtype"], r["failures"]) for r in res["contract"] if r["failures"]]
    assert not failed, failed
    assert {r["dtype"] for r in res["contract"]} == {"float32", "bfloat16"}
    assert all(not r.get("failures") for r in res["bnb"]), res["bnb"]
    assert [r["variant"] for r in res["models"]] == ["lora", "dora", "pissa"]
    assert all(isinstance(r["compiled_over_eager"], float) for r in res["models"]), res["models"]
    assert res["merged"]["merged_over_base"] > 0
    assert (tmp_path / "gpu.md").read_text().startswith("# lora-lite GPU readiness")


def test_fusion_lever_computes_the_same_function():
    """bench/levers.py's sibling-fusion experiment: the fused and unfused LoRA models must
    compute the same function for the timing comparison to mean anything."""
    pytest.importorskip("transformers")
    script = ("import json; from bench.levers import bench_fusion; "
              "print('RESULT' + json.dumps(bench_fusion('tiny', repeats=1)))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["same_function"] and out["fused_over_unfused"] > 0
