"""The `lora-lite` command: variants, probe (embedded model, local path, bad model, a failing
variant), inspect, and the messages when optional dependencies are missing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lora_lite as ll
from lora_lite import plugins
from lora_lite.tools.cli import main

from .support.models import tiny_qwen3

pytest.importorskip("transformers")


def _probe(tmp_path, *extra) -> tuple[int, dict]:
    out = tmp_path / "out"
    rc = main(["probe", "--out", str(out), "--no-progress", "--device", "cpu", *extra])
    data = json.loads((out / "probe.json").read_text()) if (out / "probe.json").exists() else {}
    return rc, data


def test_variants_lists_installed_and_broken(capsys, monkeypatch):
    broken = plugins.BrokenPlugin("ghost", "lora-lite-ghost", "9.9", "ImportError: no module named ghost_math")
    monkeypatch.setattr(plugins._registry, "broken", [*plugins.broken_plugins(), broken])
    assert main(["variants"]) == 1  # a broken install is an error for scripts and CI
    text = capsys.readouterr().out
    for name, dist in [("lora", "lora-lite-lora"), ("pissa", "lora-lite-pissa"), ("delora", "lora-lite-delora")]:
        line = next(line for line in text.splitlines() if line.startswith(name + " "))
        assert dist in line and "0.1.0" in line and f"lora_lite_{name}" in line
    assert "lambda0=15.0" in text and "svd=full" in text
    assert "ghost (lora-lite-ghost 9.9): ImportError: no module named ghost_math" in text

    assert main(["variants", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    by_name = {v["name"]: v for v in data["variants"]}
    assert by_name["delora"]["knobs"] == {"lambda0": 15.0}
    assert data["broken"][-1]["name"] == "ghost"


def test_variants_exits_zero_when_every_plugin_loads(capsys):
    if plugins.broken_plugins():
        pytest.skip("this environment has a broken plugin installed")
    assert main(["variants"]) == 0


def test_cli_survives_a_closed_pipe():
    """`lora-lite variants | head -1`: the reader leaves early; no traceback, exit 0."""
    import subprocess
    import sys

    import os

    read, write = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", "from lora_lite.tools.cli import main; import sys; sys.exit(main(['variants']))"],
                            stdout=write, stderr=subprocess.PIPE)
    os.close(write)
    os.close(read)  # the reader is gone before the child (still importing) writes a byte
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 1) and "Traceback" not in err and "BrokenPipeError" not in err, err


def test_probe_embedded_model_writes_passing_report(tmp_path, capsys):
    rc, data = _probe(tmp_path, "--variants", "lora", "pissa", "--steps", "3")
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "ALL CHECKS PASS" in text
    for col in ("identity err", "perturb delta", "loss0", "lossN", "drop %", "grad norm", "adapter delta", "reload err"):
        assert col in text
    assert data["passed"] is True and data["settings"]["model"] == "embedded:qwen3-tiny"
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"lora", "pissa"}
    for r in rows.values():
        assert r["target_names"] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
        assert r["trainable"] == 4 * (128 + 256) + 4 * (128 + 128)  # r * (d_in + d_out), q: 128->256, v: 128->128
        assert r["identity_err"] <= 1e-5 and r["reload_err"] == 0.0
        assert r["perturb_delta"] > 1e-6 and r["grad_norm"] > 0 and r["adapter_delta"] > 0
        assert r["lossN"] < r["loss0"] and len(r["losses"]) == 4 and r["failures"] == []
    assert rows["lora"]["identity_err"] == 0.0  # B = 0: exactly the base
    md = (tmp_path / "out" / "probe.md").read_text()
    assert "| variant | targets | trainable | identity err |" in md and "| lora | 2 | 2560 |" in md
    assert (tmp_path / "out" / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_probe_local_model_directory(tmp_path, capsys):
    model_dir = tmp_path / "tiny-qwen3"
    tiny_qwen3(3).save_pretrained(model_dir)
    rc, data = _probe(tmp_path, "--model", str(model_dir), "--variants", "lora", "--steps", "2",
                      "--set", "lora.r=2")
    assert rc == 0, capsys.readouterr()
    row = data["rows"][0]
    assert data["settings"]["model"] == str(model_dir)
    assert row["trainable"] == 2 * (32 + 32) + 2 * (32 + 16)  # --set lora.r=2; q 32->32, v 32->16
    assert row["reload_err"] == 0.0 and row["lossN"] < row["loss0"]


def test_probe_knob_override_reaches_the_config(tmp_path):
    rc, data = _probe(tmp_path, "--variants", "delora", "--steps", "2", "--set", "delora.lambda0=2")
    assert rc == 0 and data["settings"]["knobs"] == {"delora": {"lambda0": 2}}
    assert data["rows"][0]["trainable"] == 4 * (128 + 256) + 1 + 4 * (128 + 128) + 1  # A, B and lambda per target


def test_probe_set_for_a_variant_not_probed_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _probe(tmp_path, "--variants", "lora", "--set", "delora.lambda0=1")
    assert exc.value.code == 2 and "--set names ['delora'], which this run does not probe" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["{tmp}/no-such-model", "{tmp}"])
def test_probe_bad_model_path_is_one_clear_line(tmp_path, capsys, model):
    rc, _ = _probe(tmp_path, "--model", model.format(tmp=tmp_path), "--variants", "lora")
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("lora-lite: error: ") and "not a model directory (no config.json there)" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_probe_uncached_hub_id_while_offline(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    rc, _ = _probe(tmp_path, "--model", "lora-lite-tests/not-a-cached-model", "--variants", "lora")
    err = capsys.readouterr().err
    assert rc == 2 and "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in err
    assert "Traceback" not in err


class _LeakyLoRA:
    """Deliberately broken: B starts non-zero, so the adapter is not the identity at init."""

    name = "leaky_test_variant"

    @staticmethod
    @ll.hookimpl
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ll.ParamSpec((cfg.r, d_in), init="kaiming"),
                "lora_B": ll.ParamSpec((d_out, cfg.r), init=0.1)}

    @staticmethod
    @ll.hookimpl
    def forward(layer, x, y):
        return y + F.linear(F.linear(x, layer.lora_A), layer.lora_B)


@pytest.fixture
def leaky_variant():
    ll.register(_LeakyLoRA)
    yield _LeakyLoRA.name
    ll.unregister(_LeakyLoRA.name)


def test_probe_exit_status_is_nonzero_when_a_check_fails(tmp_path, capsys, leaky_variant):
    rc, data = _probe(tmp_path, "--variants", "lora", leaky_variant, "--steps", "2")
    out = capsys.readouterr().out
    assert rc == 1 and data["passed"] is False
    rows = {r["variant"]: r for r in data["rows"]}
    assert rows["lora"]["passed"] is True
    assert rows[leaky_variant]["passed"] is False and rows[leaky_variant]["identity_err"] > 1e-3
    assert any(f.startswith("identity_at_init: identity error") for f in rows[leaky_variant]["failures"])
    assert "CHECKS FAILED" in out and f"{leaky_variant}: identity_at_init: identity error" in out
    assert "SOME CHECKS FAILED" in (tmp_path / "out" / "probe.md").read_text()


def test_probe_unknown_variant_lists_installed(tmp_path, capsys):
    rc, _ = _probe(tmp_path, "--variants", "nosuchvariant")
    err = capsys.readouterr().err
    assert rc == 2 and "unknown variant 'nosuchvariant'" in err and "lora" in err


def test_probe_missing_dependency_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc, _ = _probe(tmp_path, "--variants", "lora")
    err = capsys.readouterr().err
    assert rc == 2 and "needs matplotlib" in err and "pip install 'lora-lite-core[probe]'" in err


def test_inspect_prints_checkpoint_metadata(tmp_path, capsys):
    model = tiny_qwen3(0)
    ll.attach(model, ll.LoraLiteConfig(variant="lora", r=2, alpha=4, target_names=(r"\.q_proj$",), layers=(1,)))
    path = ll.save(model, tmp_path / "a.safetensors")
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "written by lora-lite-core " + ll.__version__ in text
    assert "variant lora (lora-lite-lora 0.1.0)" in text and "r=2" in text
    assert "model.layers.1.self_attn.q_proj.lora_A  (2, 32) float32" in text
    assert main(["inspect", "--json", str(path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["adapters"][0]["targets"] == ["model.layers.1.self_attn.q_proj"]
    assert data["tensors"]["model.layers.1.self_attn.q_proj.lora_B"] == {"shape": [32, 2], "dtype": "float32"}

    torch.save({"x": torch.zeros(1)}, tmp_path / "pickle.pt")
    assert main(["inspect", str(tmp_path / "pickle.pt")]) == 2
    assert "looks like a pickle" in capsys.readouterr().err


def test_core_and_cli_import_without_the_probe_extra():
    code = (
        "import sys\n"
        "for m in ('transformers', 'matplotlib', 'tqdm'): sys.modules[m] = None\n"
        "import lora_lite, lora_lite.tools.cli\n"
        "from lora_lite.tools.cli import main\n"
        "assert main(['variants']) == 0\n"
        "assert main(['probe', '--variants', 'lora']) == 2\n"
        "try:\n"
        "    import lora_lite.hf\n"
        "except lora_lite.MissingDependencyError as err:\n"
        "    print('HF-ERROR', err)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "needs transformers, matplotlib, tqdm" in proc.stderr
    assert "HF-ERROR lora_lite.hf needs transformers" in proc.stdout
