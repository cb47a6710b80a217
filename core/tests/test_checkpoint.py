import json
import os
import pickle
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lora_lite as ll
from lora_lite.testing import ToyTransformer


@pytest.fixture
def trained(model, x, tmp_path):
    ll.attach(model, ll.LoraLiteConfig(variant="t_lora", r=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    out = model(x).detach()
    path = ll.save(model, tmp_path / "adapter.safetensors")
    return path, out


def fresh():
    torch.manual_seed(0)
    return ToyTransformer()


def test_metadata(trained):
    path, _ = trained
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "lora-lite" and meta["format_version"] == "1" and meta["core_version"]
    (rec,) = json.loads(meta["adapters"])
    assert rec["variant"] == "t_lora" and rec["config"]["r"] == 2 and rec["plugin_distribution"] is None
    assert rec["targets"][0] == "layers.0.q_proj" and len(rec["base_fingerprint"]) == len(rec["targets"])


def test_round_trip_and_any_extension(trained, x, tmp_path):
    path, out = trained
    other = tmp_path / "adapter.pt"
    other.write_bytes(path.read_bytes())
    model = fresh()
    ll.load(model, other)
    assert torch.equal(model(x), out)


def check_refused(path, error, match, x):
    model = fresh()
    before = model(x).detach()
    with pytest.raises(error, match=match):
        ll.load(model, path)
    assert ll.attachments(model) == [] and torch.equal(model(x), before)


def test_pickle_is_refused(tmp_path, x):
    p = tmp_path / "adapter.pt"
    torch.save({"lora_A": torch.zeros(1)}, p)
    check_refused(p, ll.CheckpointFormatError, "never unpickles", x)
    p2 = tmp_path / "raw.pkl"
    p2.write_bytes(pickle.dumps({"a": 1}))
    check_refused(p2, ll.CheckpointFormatError, "pickle", x)


def test_empty_truncated_corrupt_missing(trained, tmp_path, x):
    path, _ = trained
    data = path.read_bytes()
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "trunc").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    check_refused(tmp_path / "empty", ll.CheckpointFormatError, "empty", x)
    check_refused(tmp_path / "trunc", ll.CheckpointFormatError, "truncated or corrupt", x)
    check_refused(tmp_path / "garbage", ll.CheckpointFormatError, "truncated or corrupt", x)
    check_refused(tmp_path / "nope", ll.CheckpointFormatError, "does not exist", x)


def rewrite(path, out, meta_fn=None, tensor_fn=None):
    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    save_file(tensor_fn(tensors) if tensor_fn else tensors, str(out), metadata=meta_fn(meta) if meta_fn else meta)
    return out


def test_foreign_safetensors_and_newer_format(trained, tmp_path, x):
    path, _ = trained
    check_refused(rewrite(path, tmp_path / "f", meta_fn=lambda m: {}), ll.CheckpointFormatError, "not a lora-lite", x)
    newer = rewrite(path, tmp_path / "n", meta_fn=lambda m: {**m, "format_version": "2"})
    check_refused(newer, ll.CheckpointFormatError, "format version '2'", x)


def test_unknown_variant_in_file(trained, tmp_path, x):
    path, _ = trained

    def meta_fn(m):
        recs = json.loads(m["adapters"])
        recs[0]["config"]["variant"] = "nosuch"
        return {**m, "adapters": json.dumps(recs)}

    check_refused(rewrite(path, tmp_path / "u", meta_fn=meta_fn), ll.UnknownVariantError, "lora-lite-nosuch", x)


def test_shape_and_dtype_mismatch(trained, tmp_path, x):
    path, _ = trained
    key = "layers.0.q_proj.lora_A"
    bad_shape = rewrite(path, tmp_path / "s", tensor_fn=lambda t: {**t, key: torch.zeros(3, 32)})
    check_refused(bad_shape, ll.CheckpointMismatchError, "shape", x)
    bad_dtype = rewrite(path, tmp_path / "d", tensor_fn=lambda t: {**t, key: t[key].half()})
    check_refused(bad_dtype, ll.CheckpointMismatchError, "float16", x)


def test_different_base_weights(trained, x):
    path, _ = trained
    model = fresh()
    with torch.no_grad():
        model.layers[1].up_proj.weight.mul_(1.01)
    before = model(x).detach()
    with pytest.raises(ll.CheckpointMismatchError, match="base weights.*layers.1.up_proj"):
        ll.load(model, path)
    assert torch.equal(model(x), before)


def test_different_architecture(trained, x):
    path, _ = trained
    torch.manual_seed(0)
    model = ToyTransformer(n_layers=3)
    with pytest.raises(ll.CheckpointMismatchError, match=r"target\(s\)"):
        ll.load(model, path)
    assert ll.attachments(model) == []


def test_interrupted_save_keeps_previous_file(trained, monkeypatch, model):
    path, _ = trained
    before = path.read_bytes()
    import lora_lite.checkpoint as ckpt

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        ll.save(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_multi_attachment_round_trip(x, tmp_path):
    model = fresh()
    ll.attach(model, ll.LoraLiteConfig(variant="t_lora", r=2, target_names=(r"q_proj$",)))
    ll.attach(model, ll.LoraLiteConfig(variant="t_scale", target_names=(r"down_proj$",)))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    out = model(x).detach()
    path = ll.save(model, tmp_path / "two.safetensors")
    ll.detach(model)
    atts = ll.load(model, path)
    assert [a.cfg.variant for a in atts] == ["t_lora", "t_scale"]
    assert torch.equal(model(x), out)
    ll.detach(model)
    assert ll.attachments(model) == []


def _train_a_step(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)


@pytest.mark.parametrize(
    "fault, expected",
    [
        (KeyboardInterrupt("power cut after the temp file was written"), KeyboardInterrupt),
        (OSError(18, "Invalid cross-device link"), ll.CheckpointError),
        (PermissionError(13, "Permission denied"), ll.CheckpointError),
    ],
    ids=["crash_before_rename", "rename_os_error", "rename_permission_error"],
)
def test_failed_rename_keeps_previous_file_and_leaves_no_temp(trained, model, monkeypatch, fault, expected):
    path, _ = trained
    before = path.read_bytes()
    written = []
    real_replace = os.replace

    def failing_replace(src, dst):
        written.append(open(src, "rb").read())  # the temp file is complete: the crash is after the write
        raise fault

    _train_a_step(model)
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(expected) as info:
        ll.save(model, path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(written) == 1
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    if expected is ll.CheckpointError:
        assert type(info.value) is ll.CheckpointError and info.value.__cause__ is fault
        assert re.search(r"could not write .*previous file at that path is unchanged.*save to another path", str(info.value))
    current = {k: v.detach() for a in ll.attachments(model) for k, v in a.adapter_tensors().items()}
    (path.parent / "interrupted").write_bytes(written[0])
    for complete in (path.parent / "interrupted", ll.save(model, path)):  # the temp file was whole; a retry works
        _, tensors = ll.read_checkpoint(complete)
        assert set(tensors) == set(current) and all(torch.equal(tensors[k], v) for k, v in current.items())


def test_full_disk_during_write_is_a_checkpoint_error(trained, model, monkeypatch):
    path, _ = trained
    before = path.read_bytes()
    import lora_lite.checkpoint as ckpt

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\x00" * 10)
        raise OSError(28, "No space left on device")

    _train_a_step(model)
    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(ll.CheckpointError, match="No space left on device.*unchanged.*free space"):
        ll.save(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code from the file ran')",))


def test_load_never_executes_code_from_the_file(tmp_path, monkeypatch, x):
    marker = tmp_path / "pwned"
    payload = _Payload(marker)
    pickle.loads(pickle.dumps(payload))  # the payload is live: unpickling it runs code
    assert marker.exists()
    marker.unlink()
    files = {
        "protocol5.pkl": pickle.dumps(payload, protocol=5),
        "protocol0.pkl": pickle.dumps(payload, protocol=0),  # text pickle, no \x80 magic byte
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"lora_A": payload}, tmp_path / "zip.pt")
    torch.save({"lora_A": payload}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    names = [*files, "zip.pt", "legacy.pt"]

    def no_unpickling(*args, **kwargs):
        raise AssertionError("load reached an unpickler")

    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "Unpickler", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    for name in names:
        check_refused(tmp_path / name, ll.CheckpointFormatError, "pickle|not a readable safetensors", x)
        assert not marker.exists(), f"loading {name} executed code from the file"


@pytest.mark.parametrize("first_bytes", [b"\x80", b"PK"], ids=["pickle_byte", "zip_bytes"])
def test_a_header_length_that_looks_like_pickle_or_zip_still_loads(trained, tmp_path, x, first_bytes):
    """~1 save in 256 has a header length whose low byte is 0x80 (a pickle's first byte)."""
    path, out = trained

    def padded(pad):
        return rewrite(path, tmp_path / "odd.safetensors", meta_fn=lambda m: {**m, "pad": "x" * pad})

    # the header length is 8-aligned and grows one byte per pad character
    length = int.from_bytes(padded(0).read_bytes()[:8], "little")
    modulus = 256 ** len(first_bytes)
    odd = padded((int.from_bytes(first_bytes, "little") - length) % modulus)
    assert odd.read_bytes()[: len(first_bytes)] == first_bytes
    model = fresh()
    ll.load(model, odd)
    assert torch.equal(model(x), out)



def test_fingerprint_is_taken_at_save_not_attach_and_only_once(model, tmp_path, monkeypatch):
    from lora_lite import runtime

    calls = []
    real = runtime.base_fingerprint
    monkeypatch.setattr(runtime, "base_fingerprint", lambda layer: calls.append(layer) or real(layer))
    att = ll.attach(model, ll.LoraLiteConfig(variant="t_lora", r=2))
    assert calls == [], "attach computed the base fingerprint; it belongs to save/load"
    ll.save(model, tmp_path / "a.safetensors")
    assert len(calls) == len(att.targets)
    ll.save(model, tmp_path / "b.safetensors")
    assert len(calls) == len(att.targets), "the frozen base was fingerprinted again"



@pytest.mark.skipif(os.name != "posix", reason="file modes and umask are POSIX")
def test_saved_file_mode_follows_the_umask_like_any_written_file(model, tmp_path):
    ll.attach(model, ll.LoraLiteConfig(variant="t_lora", r=2))
    old = os.umask(0o022)
    try:
        path = ll.save(model, tmp_path / "adapter.safetensors")
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        ll.save(model, path)  # replacing an existing file
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"], "a temporary file was left behind"
