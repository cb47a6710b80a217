"""Which PEFT config reproduces each lora-lite variant, for side-by-side runs.

One row per variant name: the lora-lite config knobs (beyond ``variant``, ``r``, ``alpha``
and the targets) and a factory for the equivalent PEFT config. A variant that is not
installed, or whose installed config rejects these knobs, is skipped with the reason
recorded in the results, so the bench keeps running while plugins come and go. A plugin
author whose knob names differ edits their row here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import lora_lite as ll

QV = ("q_proj", "v_proj")
ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET_SETS = {"qv": QV, "all": ALL_LINEARS}
R, ALPHA = 8, 16


@dataclass(frozen=True)
class Pairing:
    """How to build the same adapter in lora-lite and in PEFT."""

    name: str
    peft_config: Callable[[tuple[str, ...]], Any]
    lite_knobs: dict[str, Any] = field(default_factory=dict)
    # ``(peft_model, batch) -> None`` for data-calibrated inits (EVA)
    peft_calibrate: Callable[[Any, dict], None] | None = None
    # ``(base model, peft config, batch) -> None`` run before ``get_peft_model`` (LoRA-GA, CorDA)
    peft_preprocess: Callable[[Any, Any, dict], None] | None = None
    calibrated: bool = False
    only_targets: tuple[str, ...] | None = None
    # ``targets -> [(lora-lite variant, its targets), ...]`` when PEFT's one config is
    # several lora-lite attachments (IA3's feed-forward layers are ``ia3_ff``)
    lite_split: Callable[[tuple[str, ...]], list[tuple[str, tuple[str, ...]]]] | None = None

    def lite_configs(self, targets: tuple[str, ...], **overrides) -> list[ll.LoraLiteConfig]:
        groups = self.lite_split(targets) if self.lite_split else [(self.name, targets)]
        return [lite_config(self, group, variant=variant, **overrides) for variant, group in groups if group]


def _lora(**kw):
    def make(targets):
        from peft import LoraConfig

        return LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(targets), **kw)

    return make


def _peft(cls_name: str, **kw):
    def make(targets):
        import peft

        return getattr(peft, cls_name)(target_modules=list(targets), **kw)

    return make


IA3_FF = ("down_proj",)  # IA3's feed-forward layers: their input is scaled, not their output


def _ia3(targets):
    from peft import IA3Config

    return IA3Config(target_modules=list(targets), feedforward_modules=[t for t in targets if t in IA3_FF])


def _ia3_split(targets):
    return [("ia3", tuple(t for t in targets if t not in IA3_FF)), ("ia3_ff", tuple(t for t in targets if t in IA3_FF))]


def _eva(targets):
    from peft import EvaConfig, LoraConfig

    return LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(targets),
        init_lora_weights="eva", eva_config=EvaConfig(rho=1.0),
    )


def _eva_calibrate(peft_model, batch):
    from peft import initialize_lora_eva_weights

    initialize_lora_eva_weights(peft_model, dataloader=[batch], show_progress_bar=False)



def _loraga(targets):
    from peft import LoraConfig, LoraGAConfig

    return LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(targets),
                      init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())


def _loraga_preprocess(model, peft_config, batch):
    from peft import preprocess_loraga

    labelled = {**batch, "labels": batch["input_ids"]}
    preprocess_loraga(model, peft_config, lambda: model(**labelled).loss.backward())


def _corda(targets):
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig

    return LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(targets),
                      init_lora_weights="corda", corda_config=CordaConfig(corda_method="ipm"))


def _corda_preprocess(model, peft_config, batch):
    from peft.tuners.lora.corda import preprocess_corda  # needs the attrs package (PEFT 0.21 imports it)

    rows = [{k: v[i:i + 1] for k, v in batch.items() if k != "labels"} for i in range(len(batch["input_ids"]))]
    preprocess_corda(model, peft_config, run_model=lambda: [model(**row) for row in rows])

PAIRINGS: dict[str, Pairing] = {p.name: p for p in [
    Pairing("lora", _lora()),
    Pairing("pissa", _lora(init_lora_weights="pissa_niter_4"), {"svd": "lowrank", "niter": 4}),
    Pairing("delora", _peft("DeloraConfig", r=R, delora_lambda=15), {"lambda0": 15.0}),
    Pairing("dora", _lora(use_dora=True)),
    Pairing("vera", _peft("VeraConfig", r=R, vera_dropout=0.0)),
    Pairing("ia3", _ia3, lite_split=_ia3_split),
    Pairing("hra", _peft("HRAConfig", r=R)),
    Pairing("oft", _peft("OFTConfig", r=0, oft_block_size=32), {"r": 0, "oft_block_size": 32}),
    Pairing("road", _peft("RoadConfig", variant="road_1", group_size=32), {"road_variant": "road_1", "group_size": 32}),
    Pairing("eva", _eva, {}, peft_calibrate=_eva_calibrate, calibrated=True),
    Pairing("loha", _peft("LoHaConfig", r=R, alpha=ALPHA)),
    Pairing("lokr", _peft("LoKrConfig", r=R, alpha=ALPHA)),
    Pairing("hira", _peft("HiraConfig", r=R, hira_dropout=0.0)),
    # PEFT on CPU runs boft_n_butterfly_factor=1 whatever the config: keep the bench at 1
    Pairing("boft", _peft("BOFTConfig", boft_block_size=4, boft_block_num=0), {"boft_block_size": 4, "boft_block_num": 0}),
    # PEFT's default init draws N(0, 1) coefficients: ask it for zeros, as lora-lite starts
    Pairing("fourierft", _peft("FourierFTConfig", n_frequency=1000, scaling=150.0, init_weights=True),
            {"n_frequency": 1000, "scaling": 150.0}),
    Pairing("shira", _peft("ShiraConfig", r=R)),
    Pairing("miss", _peft("MissConfig", r=R)),
    Pairing("c3a", _peft("C3AConfig", block_size=16, init_weights=True), {"block_size": 16}),  # divides every bench width
    Pairing("randlora", _peft("RandLoraConfig", r=R, randlora_alpha=int(ALPHA), randlora_dropout=0.0), {"alpha": ALPHA}),
    Pairing("vblora", _peft("VBLoRAConfig", r=4, num_vectors=256, vector_length=16, topk=2),  # 16 divides every width
            {"r": 4, "num_vectors": 256, "vector_length": 16}),
    Pairing("lora_ga", _loraga, calibrated=True, peft_preprocess=_loraga_preprocess),
    Pairing("corda", _corda, calibrated=True, peft_preprocess=_corda_preprocess),
    Pairing("psoft", _peft("PsoftConfig", r=R, psoft_alpha=ALPHA)),
    Pairing("gralora", _peft("GraloraConfig", r=R, alpha=ALPHA)),
    # the bench loop calls neither ll.step nor update_and_allocate: both sides run as fixed-rank SVD-form LoRA
    Pairing("adalora", _peft("AdaLoraConfig", init_r=R, target_r=max(1, 2 * R // 3), lora_alpha=2 * R,
                             total_step=1000, lora_dropout=0.0), {"total_step": 1000}),
]}


def lite_config(p: Pairing, targets: tuple[str, ...], **overrides) -> ll.LoraLiteConfig:
    names = (r"\.(" + "|".join(targets) + r")$",)
    kw = {"variant": p.name, "r": R, "alpha": ALPHA, "target_names": names, **p.lite_knobs, **overrides}
    return ll.LoraLiteConfig(**kw)


def available() -> tuple[list[Pairing], dict[str, str]]:
    """``(pairings to run, {name: why skipped})`` for this environment."""
    installed = {v.name for v in ll.list_variants()}
    run, skipped = [], {}
    for p in PAIRINGS.values():
        if p.name not in installed:
            skipped[p.name] = "lora-lite plugin not installed"
            continue
        try:
            p.lite_configs(ALL_LINEARS)  # every variant of a split must be installed too
            p.peft_config(QV)
        except Exception as err:  # a knob rename in a plugin or PEFT: report, keep going
            skipped[p.name] = f"{type(err).__name__}: {err}"
            continue
        run.append(p)
    covered = set(PAIRINGS) | {v for p in PAIRINGS.values() if p.lite_split for v, _ in p.lite_split(ALL_LINEARS)}
    for name in sorted(installed - covered):
        skipped[name] = "no PEFT counterpart in bench/variants.py"
    return run, skipped
