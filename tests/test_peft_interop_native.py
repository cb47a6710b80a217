"""Native PEFT formats beyond LoRA, both ways: IA3 (with feedforward_modules: ``ia3`` +
``ia3_ff``), VeRA (shared projections, saved or regenerated from the PRNG key), OFT, HRA,
RoAd, DeLoRA, LoHa, LoKr (per-layer factor forms), HiRA, BOFT, MiSS (three modes),
FourierFT, SHiRA, C3A, GraLoRA, PSOFT, VB-LoRA, RandLoRA (shared bases and PEFT's
per-target copies), AdaLoRA. Each case builds the same adapter in lora-lite and in PEFT."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import lora_lite as ll

from .support.models import tiny_qwen3, token_batch
from .test_peft_interop_import import edit

peft = pytest.importorskip("peft")

QV, FF = ("q_proj", "v_proj"), ("down_proj",)
QVD = QV + FF


def _ia3(ff):
    return lambda: peft.IA3Config(target_modules=list(QVD if ff else QV), feedforward_modules=list(FF if ff else ()))


# name -> (lora-lite attachments [(variant, targets, knobs)], PEFT config factory)
CASES = {
    "ia3": ([("ia3", QV, {})], _ia3(False)),
    "ia3+ia3_ff": ([("ia3", QV, {}), ("ia3_ff", FF, {})], _ia3(True)),
    "vera": ([("vera", QVD, {"r": 4, "projection_prng_key": 3, "save_projection": True})],
             lambda: peft.VeraConfig(r=4, target_modules=list(QVD), projection_prng_key=3, save_projection=True)),
    "vera-prng": ([("vera", QVD, {"r": 4, "projection_prng_key": 11, "d_initial": 0.2})],
                  lambda: peft.VeraConfig(r=4, target_modules=list(QVD), projection_prng_key=11, d_initial=0.2,
                                          save_projection=False)),
    "oft": ([("oft", QVD, {"r": 0, "oft_block_size": 8})],
            lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=list(QVD))),
    "oft-cayley-coft": ([("oft", QVD, {"r": 2, "oft_block_size": 0, "use_cayley_neumann": False, "coft": True,
                                       "eps": 0.5})],
                        lambda: peft.OFTConfig(r=2, oft_block_size=0, use_cayley_neumann=False, coft=True, eps=0.5,
                                               target_modules=list(QVD))),
    "hra": ([("hra", QVD, {"r": 4})], lambda: peft.HRAConfig(r=4, target_modules=list(QVD))),
    "road_1": ([("road", QVD, {"road_variant": "road_1", "group_size": 8})],
               lambda: peft.RoadConfig(variant="road_1", group_size=8, target_modules=list(QVD))),
    "road_4": ([("road", QVD, {"road_variant": "road_4", "group_size": 4})],
               lambda: peft.RoadConfig(variant="road_4", group_size=4, target_modules=list(QVD))),
    "delora": ([("delora", QVD, {"r": 4, "lambda0": 15.0})],
               lambda: peft.DeloraConfig(r=4, delora_lambda=15, target_modules=list(QVD))),
    # spectral / sparse / structured (fmt2): fourierft, shira, c3a, gralora, psoft
    "fourierft": ([("fourierft", QVD, {"n_frequency": 50, "scaling": 100.0, "random_loc_seed": 13})],
                  lambda: peft.FourierFTConfig(n_frequency=50, scaling=100.0, random_loc_seed=13,
                                               target_modules=list(QVD))),
    "shira": ([("shira", QVD, {"r": 2, "random_seed": 5})],
              lambda: peft.ShiraConfig(r=2, random_seed=5, target_modules=list(QVD))),
    "c3a": ([("c3a", QVD, {"block_size": 8})],
            lambda: peft.C3AConfig(block_size=8, init_weights=True, target_modules=list(QVD))),
    "gralora": ([("gralora", QVD, {"r": 8, "alpha": 12.0, "gralora_k": 4})],
                lambda: peft.GraloraConfig(r=8, alpha=12, gralora_k=4, target_modules=list(QVD))),
    "psoft": ([("psoft", QVD, {"r": 4, "alpha": 6.0})],
              lambda: peft.PsoftConfig(r=4, psoft_alpha=6, target_modules=list(QVD))),
    "psoft-lowrank-neumann": (
        [("psoft", QVD, {"r": 4, "alpha": 2.0, "ab_svd_init": "pissa_init", "svd": "lowrank", "niter": 3,
                         "seed": 5, "use_cayley_neumann": True, "num_cayley_neumann_terms": 4,
                         "cayley_neumann_eps": 0.5})],
        lambda: peft.PsoftConfig(r=4, psoft_alpha=2, ab_svd_init="pissa_init", psoft_svd="lowrank",
                                 psoft_svd_lowrank_niter=3, random_seed=5, use_cayley_neumann=True,
                                 num_cayley_neumann_terms=4, cayley_neumann_eps=0.5, target_modules=list(QVD))),
    # -- loha, hira, boft, miss (fmt1) --
    "loha": ([("loha", QVD, {"r": 3, "alpha": 5.0})],
             lambda: peft.LoHaConfig(r=3, alpha=5, target_modules=list(QVD))),
    "hira": ([("hira", QVD, {"r": 4})], lambda: peft.HiraConfig(r=4, target_modules=list(QVD))),
    "boft": ([("boft", QVD, {"boft_block_size": 8})],
             lambda: peft.BOFTConfig(boft_block_size=8, target_modules=list(QVD))),
    "boft-butterfly": ([("boft", QVD, {"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 2})],
                       lambda: peft.BOFTConfig(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=2,
                                               target_modules=list(QVD))),
    "miss": ([("miss", QVD, {"r": 8, "mode": "balance"})], lambda: peft.MissConfig(r=8, target_modules=list(QVD))),
    "miss-bat": ([("miss", QVD, {"r": 4, "mode": "bat"})],
                 lambda: peft.MissConfig(r=4, init_weights="bat", target_modules=list(QVD))),
    "miss-mini": ([("miss", QVD, {"r": 4, "mode": "mini", "mini_r": 2})],
                  lambda: peft.MissConfig(r=4, init_weights="mini", mini_r=2, target_modules=list(QVD))),
    # lokr: W1 full, W2 a rank-2 pair on every target
    "lokr": ([("lokr", QVD, {"r": 2, "alpha": 3.0})],
             lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=list(QVD))),
    "lokr-decompose-both": ([("lokr", QVD, {"r": 1, "decompose_both": True})],
                            lambda: peft.LoKrConfig(r=1, alpha=16, decompose_both=True, target_modules=list(QVD))),
    # factor 2: q/v keep a full W2, down_proj splits it (a layer's tensors follow its shape)
    "lokr-factor": ([("lokr", QVD, {"r": 8, "decompose_factor": 2})],
                    lambda: peft.LoKrConfig(r=8, alpha=16, decompose_factor=2, target_modules=list(QVD))),
    # -- end fmt1 --
    # fmt3: vblora, randlora, adalora
    "vblora": ([("vblora", QVD, {"r": 3, "num_vectors": 16, "vector_length": 8, "topk": 3, "subtract_init": False,
                                 "init_logits_std": 0.2})],
               lambda: peft.VBLoRAConfig(r=3, num_vectors=16, vector_length=8, topk=3, init_logits_std=0.2,
                                         target_modules=list(QVD))),
    "randlora": ([("randlora", QVD, {"r": 4, "alpha": 8.0, "projection_prng_key": 3, "save_projection": True})],
                 lambda: peft.RandLoraConfig(r=4, randlora_alpha=8, projection_prng_key=3, save_projection=True,
                                             target_modules=list(QVD))),
    "randlora-sparse": ([("randlora", QVD, {"r": 8, "alpha": 16.0, "projection_prng_key": 5, "sparse": True})],
                        lambda: peft.RandLoraConfig(r=8, randlora_alpha=16, projection_prng_key=5, sparse=True,
                                                    save_projection=False, target_modules=list(QVD))),
    "adalora": ([("adalora", QVD, {"r": 6, "alpha": 32.0, "target_r": 3, "total_step": 20, "tinit": 2, "tfinal": 3,
                                   "deltaT": 2, "beta1": 0.8, "orth_reg_weight": 0.3})],
                lambda: peft.AdaLoraConfig(init_r=6, lora_alpha=32, target_r=3, total_step=20, tinit=2, tfinal=3,
                                           deltaT=2, beta1=0.8, orth_reg_weight=0.3, target_modules=list(QVD))),
    # fmt4: eva (a LoRA init in PEFT: init_lora_weights="eva", after initialize_lora_eva_weights)
    "eva": ([("eva", QVD, {"r": 4, "alpha": 6.0, "label_mask_value": -7})],
            lambda: peft.LoraConfig(r=4, lora_alpha=6, init_lora_weights="eva", target_modules=list(QVD),
                                    eva_config=peft.EvaConfig(rho=1.0, label_mask_value=-7))),
}
installed = {v.name for v in ll.list_variants()}
# fmt4: variants calibrated at attach, with the batches both libraries calibrate on
CALIBRATION = {"eva": lambda: [token_batch(batch=4, seq=16)]}


class _BlockDiagExtension:
    """A pure-torch stand-in for PEFT's ``fbd_cuda`` extension (block_diag per factor)."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]


@pytest.fixture(autouse=True)
def _boft_factors_on_cpu(monkeypatch):
    """(fmt1) PEFT's BOFT computes butterfly factors > 1 only with its CUDA extension and
    otherwise warns and uses one factor: give it the stand-in so the boft cases compare m = 2."""
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: _BlockDiagExtension)


def case(name):
    lite, make = CASES[name]
    missing = {v for v, _, _ in lite} - installed
    return pytest.param(name, marks=pytest.mark.skipif(bool(missing), reason=f"{missing} not installed"))


ALL = [case(n) for n in CASES]


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def lite_trained(name, seed=5):
    """The case's lora-lite attachments, every trainable tensor perturbed as training would."""
    model = tiny_qwen3()
    atts = [ll.attach(model, ll.LoraLiteConfig(variant=v, target_names=tuple(rf"\.{t}$" for t in targets), **knobs),
                      CALIBRATION[v]() if v in CALIBRATION else None)
            for v, targets, knobs in CASES[name][0]]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for att in atts:
            for p in att.trainable_parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)
    return model, atts


def peft_trained(name, directory, seed=7):
    """The case's PEFT adapter with every trainable tensor (and VeRA's saved projections)
    perturbed, saved by PEFT."""
    pm = peft.get_peft_model(tiny_qwen3(), CASES[name][1]()).eval()
    if name == "eva":  # PEFT's calibration: A from the components, B zero, then trained as any LoRA
        from peft.tuners.lora.eva import initialize_lora_eva_weights

        initialize_lora_eva_weights(pm, dataloader=CALIBRATION["eva"](), show_progress_bar=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        if name == "vera":  # saved projections are read from the file, not regenerated
            for buf in (pm.base_model.vera_A["default"], pm.base_model.vera_B["default"]):
                buf.add_(torch.randn(buf.shape, generator=g) * 0.05)
        if name == "randlora":  # as vera's (every layer holds the same buffers)
            for buf in (pm.base_model.randlora_A["default"], pm.base_model.randlora_B["default"]):
                buf.add_((torch.randn(buf.shape, generator=g) * 0.05).to(buf.dtype))
    pm.save_pretrained(str(directory))
    return pm


@pytest.mark.parametrize("name", ALL)
def test_native_export_matches_peft_logits(tmp_path, name):
    model, atts = lite_trained(name)
    batch = token_batch()
    ours = logits(model, batch)
    assert (ours - logits(tiny_qwen3(), batch)).abs().max() > 1e-3, "the adapter must change the outputs"
    ll.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == CASES[name][1]().peft_type.value
    pm = peft.PeftModel.from_pretrained(tiny_qwen3(), str(tmp_path)).eval()
    # (read before a forward: COFT rescales its tensors in place in every forward, in both libraries)
    landed = {k: v.clone() for k, v in peft.get_peft_model_state_dict(pm).items()}
    theirs = logits(pm, batch)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    # every exported tensor landed in PEFT bit for bit, and PEFT holds nothing else
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(landed) == set(saved)
    for k, v in saved.items():
        assert torch.equal(landed[k], v), k
    def written(a, t, k):  # a layer's own tensors; a shared one (and its per-target copies) only when persistent
        return k in a.specs[t.name] and (k not in a.variant.peft.shared or a.specs[t.name][k].persistent)
    assert len(saved) == sum(sum(written(a, t, k) for t in a.targets for k in a.variant.peft.keys)
                             + sum(written(a, a.targets[0], k) for k in a.variant.peft.shared) for a in atts)


@pytest.mark.parametrize("name", ALL)
def test_native_import_matches_peft_logits(tmp_path, name):
    pm = peft_trained(name, tmp_path)
    batch = token_batch()
    theirs = logits(pm, batch)
    assert (theirs - logits(tiny_qwen3(), batch)).abs().max() > 1e-3, "the adapter must change the outputs"
    model = tiny_qwen3()
    att = ll.import_peft(model, tmp_path)
    assert [a.cfg.variant for a in ll.attachments(model)] == [v for v, _, _ in CASES[name][0]]
    assert att is ll.attachments(model)[0]
    for a, (_, _, knobs) in zip(ll.attachments(model), CASES[name][0]):
        assert {k: getattr(a.cfg, k) for k in knobs} == knobs
    # every tensor in the file is in lora-lite exactly (up to PEFT's shape), checked before a
    # forward (COFT rescales in place)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    seen = set()
    for a in ll.attachments(model):
        fmt = a.variant.peft
        places = [(f"base_model.model.{t.name}.{suffix}", t.layer, name) for t in a.targets
                  for name, suffix in fmt.keys.items() if name in a.specs[t.name]
                  and (name not in fmt.shared or f"base_model.model.{t.name}.{suffix}" in saved)]
        places += [(key, a.targets[0].layer, name) for name, key in fmt.shared.items() if key in saved]
        for key, layer, name in places:
            got = getattr(layer, name)
            assert torch.equal(got.reshape(saved[key].shape), saved[key].to(got.dtype)), key
            seen.add(key)
    assert seen == set(saved)
    torch.testing.assert_close(logits(model, batch), theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_native_export_then_import_round_trips_exactly(tmp_path, name):
    model, atts = lite_trained(name)
    ll.export_peft(model, tmp_path)
    fresh = tiny_qwen3()
    ll.import_peft(fresh, tmp_path)
    back = ll.attachments(fresh)
    assert [a.cfg.variant for a in back] == [a.cfg.variant for a in atts]
    for a, b in zip(atts, back):
        assert a.target_names == b.target_names
        x, y = a.adapter_tensors(), b.adapter_tensors()
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)
    batch = token_batch()
    torch.testing.assert_close(logits(fresh, batch), logits(model, batch), rtol=0, atol=0)


def test_vera_without_saved_projections_regenerates_peft_draw(tmp_path):
    """save_projection=False: neither file holds the projections; both libraries draw them from
    projection_prng_key, and the draws are equal bit for bit."""
    if "vera" not in installed:
        pytest.skip("vera not installed")
    pm = peft_trained("vera-prng", tmp_path)
    assert not any("vera_A" in k for k in load_file(str(tmp_path / "adapter_model.safetensors")))
    model = tiny_qwen3()
    att = ll.import_peft(model, tmp_path)
    layer = att.targets[0].layer
    assert torch.equal(layer.lora_vera_A, pm.base_model.vera_A["default"])
    assert torch.equal(layer.lora_vera_B, pm.base_model.vera_B["default"])


def test_shira_mask_travels_in_the_file_both_ways(tmp_path):
    """PEFT saves SHiRA's indices and its load uses them (no redraw from random_seed): a custom
    mask (PEFT's user mask_fn) reaches lora-lite, and an edited lora_index reaches PEFT."""
    if "shira" not in installed:
        pytest.skip("shira not installed")

    def last_k(base_layer, r, **_):  # not the seeded draw: the last k entries of the weight
        d_out, d_in = base_layer.weight.shape
        mask = torch.zeros(d_out * d_in)
        mask[-r * (d_in + d_out):] = 1
        return mask.view(d_out, d_in)

    config = peft.ShiraConfig(r=2, random_seed=5, target_modules=list(QVD))
    config.mask_fn = last_k
    pm = peft.get_peft_model(tiny_qwen3(), config).eval()
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    pm.save_pretrained(str(tmp_path / "peft"))
    batch = token_batch()
    theirs = logits(pm, batch)
    model = tiny_qwen3()
    att = ll.import_peft(model, tmp_path / "peft")
    for t in att.targets:
        k = t.layer.lora_index.shape[1]
        flat = t.layer.lora_index[0].long() * t.d_in + t.layer.lora_index[1].long()
        assert torch.equal(flat, torch.arange(t.d_in * t.d_out - k, t.d_in * t.d_out)), t.name
    torch.testing.assert_close(logits(model, batch), theirs, rtol=0, atol=1e-5)
    ll.export_peft(model, tmp_path / "back")
    original, back = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "back"))
    assert set(original) == set(back) and all(torch.equal(original[k], back[k]) for k in original)
    again = peft.PeftModel.from_pretrained(tiny_qwen3(), str(tmp_path / "back")).eval()  # config: mask_type random
    torch.testing.assert_close(logits(again, batch), theirs, rtol=0, atol=1e-5)


def test_fourierft_positions_are_redrawn_from_the_seed_and_an_edited_one_is_refused(tmp_path):
    """PEFT does not save FourierFT's positions: both libraries draw them from random_loc_seed.
    An attachment whose lora_index is not that draw has no PEFT form: export refuses, writes nothing."""
    if "fourierft" not in installed:
        pytest.skip("fourierft not installed")
    pm = peft_trained("fourierft", tmp_path / "peft")
    assert not any("indices" in k for k in load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    model = tiny_qwen3()
    att = ll.import_peft(model, tmp_path / "peft")
    for t in att.targets:
        rows, cols = pm.get_submodule("base_model.model." + t.name).indices["default"]
        assert torch.equal(t.layer.lora_index, rows * t.d_in + cols), t.name
    with torch.no_grad():
        att.targets[0].layer.lora_index[:2] = att.targets[0].layer.lora_index[:2].flip(0)
    with pytest.raises(ll.PeftInteropError, match="not the draw of random_loc_seed=13"):
        ll.export_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name, knobs, match", [
    ("c3a", {"block_size": 32}, "uses block 16"),  # v_proj: d_out 16, gcd fallback (PEFT refuses the layer)
    ("gralora", {"r": 6, "gralora_k": 3}, "uses 2 x 2"),  # fallback k' (PEFT raises)
    ("gralora", {"r": 4, "hybrid_r": 2}, "hybrid_r=2"),
    # other tensor sets: core's tensor check refuses before convert runs (its message: NOTES-fmt2.md)
    ("psoft", {"r": 4, "orth": False}, "psoft PEFT format maps"),
    ("psoft", {"r": 4, "mag_a": False}, "psoft PEFT format maps"),
])
def test_lite_configs_without_a_peft_form_are_refused_on_export(tmp_path, name, knobs, match):
    if name not in installed:
        pytest.skip(f"{name} not installed")
    model = tiny_qwen3()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback block sizes warn at attach
        ll.attach(model, ll.LoraLiteConfig(variant=name, target_names=tuple(rf"\.{t}$" for t in QVD), **knobs))
    with pytest.raises(ll.PeftInteropError, match=match):
        ll.export_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


S = "base_model.model.model.layers.0.self_attn"


@pytest.mark.parametrize("name, change, match", [
    ("hra", {"config": {"apply_GS": True}}, "apply_GS=True: hra reads apply_GS=False only"),
    ("oft", {"config": {"block_share": True}}, "block_share=True"),
    ("oft", {"config": {"bias": "all"}}, "bias='all'"),
    ("ia3", {"config": {"fan_in_fan_out": True}}, "fan_in_fan_out"),
    ("ia3", {"config": {"modules_to_save": ["lm_head"]}}, "modules_to_save"),
    ("ia3+ia3_ff", {"config": {"feedforward_modules": []}}, r"shape \(1, 64\) in the file but \(32, 1\)"),
    ("vera", {"drop": ["base_model.vera_A", "base_model.vera_B"]}, "no 'base_model.vera_A' in the file"),
    ("vera", {"config": {"save_projection": False}}, "regenerated from the config"),
    ("vera", {"drop": [f"{S}.q_proj.vera_lambda_b"]}, "without all of"),
    ("road_1", {"config": {"variant": "road_9"}}, "valid road config"),
    ("delora", {"config": {"lambda_pattern": {"q_proj": 3.0}}}, "lambda_pattern"),
    ("delora", {"add": {f"{S}.q_proj.delora_C": torch.zeros(3)}}, "not a delora weight"),
    ("oft", {"config": {"target_modules": ["q_proj"]}}, "not selected"),
    # fmt2: fourierft, shira, c3a, gralora, psoft
    ("fourierft", {"config": {"n_frequency_pattern": {"q_proj": 20}}}, "n_frequency_pattern"),
    ("fourierft", {"config": {"bias": "fourier_only"}}, "bias='fourier_only'"),
    ("fourierft", {"config": {"fan_in_fan_out": True}}, "fan_in_fan_out"),
    ("fourierft", {"add": {f"{S}.q_proj.fourierft_indices": torch.zeros(2, 50)}}, "not a fourierft weight"),
    ("shira", {"config": {"fan_in_fan_out": True}}, "fan_in_fan_out"),
    ("shira", {"config": {"modules_to_save": ["lm_head"]}}, "modules_to_save"),
    ("shira", {"drop": [f"{S}.q_proj.shira_indices"]}, "without all of"),
    ("c3a", {"config": {"block_size_pattern": {"q_proj": 4}}}, "block_size_pattern"),
    ("c3a", {"config": {"bias": "c3a_only"}}, "bias='c3a_only'"),
    ("c3a", {"config": {"block_size": 4}}, r"shape \(4, 4, 8\) in the file but \(8, 8, 4\)"),
    ("gralora", {"config": {"hybrid_r": 2}}, "hybrid_r=2: gralora reads hybrid_r=0 only"),
    ("gralora", {"config": {"bias": "all"}}, "bias='all'"),
    ("gralora", {"config": {"fan_in_fan_out": True}}, "fan_in_fan_out"),
    ("psoft", {"config": {"psoft_orth": False}}, "psoft_orth=False: psoft reads psoft_orth=True only"),
    ("psoft", {"config": {"psoft_mag_a": False}}, "psoft_mag_a=False"),
    ("psoft", {"config": {"psoft_mag_b": False}}, "psoft_mag_b=False"),
    ("psoft", {"config": {"fan_in_fan_out": True}}, "fan_in_fan_out"),
    ("psoft", {"config": {"ab_svd_init": "olora"}}, "valid psoft config"),
    # -- fmt1: loha, hira, boft, miss --
    ("loha", {"config": {"rank_pattern": {"q_proj": 2}}}, "rank_pattern"),
    ("loha", {"config": {"alpha_pattern": {"q_proj": 2}}}, "alpha_pattern"),
    ("loha", {"add": {f"{S}.q_proj.hada_t1": torch.zeros(3, 3, 1, 1)}}, "not a loha weight"),  # CP core
    ("hira", {"config": {"rank_pattern": {"q_proj": 2}}}, "rank_pattern"),
    ("hira", {"add": {"base_model.model.model.embed_tokens.hira_embedding_A": torch.zeros(4, 128)}},
     "not a hira weight"),
    ("boft", {"config": {"bias": "all"}}, "bias='all'"),
    ("boft-butterfly", {"config": {"boft_n_butterfly_factor": 1}}, r"shape \(2, 4, 8, 8\) in the file"),
    ("miss", {"config": {"bias": "lora_only"}}, "bias='lora_only'"),
    ("miss-bat", {"config": {"init_weights": "mini"}}, r"shape \(8, 4, 4\) in the file but \(4, 1\)"),
    ("lokr", {"config": {"rank_pattern": {"q_proj": 4}}}, "rank_pattern"),
    ("lokr", {"config": {"alpha_pattern": {"q_proj": 4}}}, "alpha_pattern"),
    ("lokr", {"add": {f"{S}.q_proj.lokr_t2": torch.zeros(2, 2, 1, 1)}}, "not a lokr weight"),  # conv CP core
    ("lokr", {"config": {"decompose_both": True, "r": 1}}, r"lokr_w1_a', 'lokr_w1_b', 'lokr_w2_a', 'lokr_w2_b'\] here"),
    ("lokr-factor", {"config": {"decompose_factor": -1}}, r"down_proj has \['lokr_w1', 'lokr_w2_a', 'lokr_w2_b'\] in the file but \['lokr_w1', 'lokr_w2'\] here"),
    # -- end fmt1 --
    # fmt3: vblora, randlora, adalora
    ("vblora", {"config": {"save_only_topk_weights": True}}, "save_only_topk_weights=True: vblora reads"),
    ("vblora", {"config": {"fan_in_fan_out": True}}, "fan_in_fan_out"),
    ("vblora", {"drop": ["base_model.vblora_vector_bank"]}, "no 'base_model.vblora_vector_bank' in the file"),
    ("randlora", {"drop": ["base_model.randlora_A", "base_model.randlora_B"]}, "no 'base_model.randlora_A' in the file"),
    ("randlora", {"add": {f"{S}.q_proj.randlora_A": torch.zeros(4, 1, 32)}}, "not a copy of 'base_model.randlora_A'"),
    ("randlora-sparse", {"config": {"very_sparse": True}}, "valid randlora config"),
    ("randlora", {"config": {"bias": "randlora_only"}}, "bias='randlora_only'"),
    ("adalora", {"config": {"rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": [True] * 3}}},
     "rank_pattern of model.layers.0.self_attn.q_proj"),
    ("adalora", {"config": {"lora_bias": True}}, "lora_bias"),
    ("adalora", {"config": {"alpha_pattern": {"q_proj": 2}}}, "alpha_pattern"),
    ("adalora", {"config": {"modules_to_save": ["lm_head"]}}, "modules_to_save"),
    # fmt4: eva (rank_pattern is read: padded to one r when the scale is one; unconverted corda,
    # lora_ga files: plugins/corda, plugins/lora_ga tests)
    ("eva", {"config": {"rank_pattern": {"model.layers.0.self_attn.q_proj": 2}}},
     r"q_proj: lora_A has rank 4 and lora_B 4 in the file, but r / rank_pattern give 2"),
    ("eva", {"config": {"alpha_pattern": {"model.layers.0.self_attn.q_proj": 3}}}, "scales by 0.75"),
    ("eva", {"config": {"use_dora": True}}, "lora-lite-dora|lora_magnitude_vector"),  # read as dora
    ("eva", {"config": {"lora_bias": True}}, "lora_bias"),
    ("eva", {"config": {"modules_to_save": ["lm_head"]}}, "modules_to_save"),
])
def test_mismatching_native_adapters_fail_and_leave_the_model_alone(tmp_path, name, change, match):
    if {v for v, _, _ in CASES[name][0]} - installed:
        pytest.skip("variant not installed")
    peft_trained(name, tmp_path)
    edit(tmp_path, **change)
    model = tiny_qwen3()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.PeftInteropError, match=match):
        ll.import_peft(model, tmp_path)
    assert ll.attachments(model) == []
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())


def test_attachments_of_different_formats_do_not_join(tmp_path):
    if not {"ia3", "hra"} <= installed:
        pytest.skip("ia3/hra not installed")
    model = tiny_qwen3()
    ll.attach(model, ll.LoraLiteConfig(variant="ia3", target_names=(r"\.q_proj$",)))
    ll.attach(model, ll.LoraLiteConfig(variant="hra", r=2, target_names=(r"\.v_proj$",)))
    with pytest.raises(ll.PeftInteropError, match="2 attachments"):
        ll.export_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_ia3_pair_writes_one_config_and_the_cli_round_trips_it(tmp_path):
    if not {"ia3", "ia3_ff"} <= installed:
        pytest.skip("ia3 not installed")
    from .test_peft_interop_import import cli

    model, atts = lite_trained("ia3+ia3_ff")
    ll.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"] and config["feedforward_modules"] == ["down_proj"]
    assert "r" not in config and "lora_alpha" not in config
    alone, _ = lite_trained("ia3")
    ll.export_peft(alone, tmp_path / "alone")  # PEFT would fill a missing list from its per-model default
    assert json.loads((tmp_path / "alone" / "adapter_config.json").read_text())["feedforward_modules"] == []

    base_dir = tmp_path / "base"
    tiny_qwen3().save_pretrained(str(base_dir))
    checkpoint = tmp_path / "adapter.safetensors"
    assert cli(["import-peft", str(tmp_path / "peft"), str(checkpoint), "--model", str(base_dir)]) == 0
    assert cli(["export-peft", str(checkpoint), str(tmp_path / "back"), "--model", str(base_dir)]) == 0
    original, back = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "back"))
    assert set(original) == set(back) and all(torch.equal(original[k], back[k]) for k in original)


def test_ia3_pair_on_some_layers_is_written_with_full_paths(tmp_path):
    if not {"ia3", "ia3_ff"} <= installed:
        pytest.skip("ia3 not installed")
    model = tiny_qwen3()
    atts = [ll.attach(model, ll.LoraLiteConfig(variant="ia3", target_names=(r"\.q_proj$",), layers=(1,))),
            ll.attach(model, ll.LoraLiteConfig(variant="ia3_ff", target_names=(r"\.down_proj$",)))]
    with torch.no_grad():
        for p in (p for a in atts for p in a.trainable_parameters()):
            p.add_(torch.randn_like(p) * 0.1)
    batch = token_batch()
    ours = logits(model, batch)
    ll.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["feedforward_modules"] == atts[1].target_names
    assert config["target_modules"] == atts[0].target_names + atts[1].target_names
    pm = peft.PeftModel.from_pretrained(tiny_qwen3(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(pm, batch), ours, rtol=0, atol=1e-5)
    fresh = tiny_qwen3()
    ll.import_peft(fresh, tmp_path)
    assert [a.target_names for a in ll.attachments(fresh)] == [a.target_names for a in atts]
    torch.testing.assert_close(logits(fresh, batch), ours, rtol=0, atol=0)


def test_miss_balance_file_with_mini_r_imports_as_peft_reads_it(tmp_path):
    """PEFT writes mini_r in every MiSS mode and reads it in mini mode only: a balance adapter
    saved with mini_r=4 imports as balance (mini_r back to 1), with PEFT's logits."""
    if "miss" not in installed:
        pytest.skip("miss not installed")
    pm = peft.get_peft_model(tiny_qwen3(), peft.MissConfig(r=8, mini_r=4, target_modules=list(QVD))).eval()
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    pm.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["mini_r"] == 4
    model = tiny_qwen3()
    att = ll.import_peft(model, tmp_path)
    assert (att.cfg.mode, att.cfg.mini_r) == ("balance", 1)
    batch = token_batch()
    torch.testing.assert_close(logits(model, batch), logits(pm, batch), rtol=0, atol=1e-5)
