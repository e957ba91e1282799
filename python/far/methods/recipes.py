"""Training recipes of `far distill`: named presets of its options.

"far" is this engine's default (the values far.distill and far.train.TrainConfig already have, with
stage 1's LR from STAGE1_LR; nothing is changed). "paper" is the recipe of the FAR authors' public code
(github.com/aliothren/FAR, read at its newest snapshot): every value below names the file it comes from. A preset only fills the options
the caller did not give: explicit options win.

What "paper" cannot reproduce exactly (README "Deviations from the public code"): the similarity loss
is our relative MSE (theirs torch.nn.MSELoss, the plain mean); warm-up starts at lr / warm-up steps
(theirs at 1e-5 / 1e-6); their stage 2 scales its LR by the per-process batch only.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, Optional, Tuple

from far.errors import ConfigError
from far.train.loop import TrainConfig, effective_lr

_CFG = "modeling/config_template.py"
_MAIN = "modeling/main.py"
_TRAIN = "modeling/train.py"

#: option -> (value, where the public code sets it). TrainConfig fields are stage 1's run (stage 2 reuses
#: them, with its own epochs and LR); the others are far.distill's keyword arguments.
PAPER: Dict[str, Tuple[object, str]] = {
    "epochs": (200.0, f"{_CFG} --epochs 200 (stage 1: the FAR blocks)"),
    "batch_size": (256, f"{_CFG} --batch-size 256"),
    "lr": (5e-4, f"{_CFG} --lr 5e-4, scaled by batch x processes / 512 in {_MAIN} train()"),
    "lr_scale_batch": (512, f"{_MAIN} train(): lr * batch_size * world_size / 512 (unless --unscale-lr)"),
    "min_lr": (1e-6, f"{_CFG} --min-lr 1e-6"),
    "weight_decay": (0.05, f"{_CFG} --weight-decay 0.05 (timm create_optimizer, adamw)"),
    "warmup_epochs": (5.0, f"{_CFG} --warmup-epochs 5, --block-ft-warmup-epochs 5"),
    "label_smoothing": (0.1, f"{_CFG} --smoothing 0.1 (inside the mixup targets)"),
    "grad_clip": (0.0, f"{_CFG} --clip-grad None (no clipping)"),
    "ema": (0.99996, f"{_CFG} --model-ema on, --model-ema-decay 0.99996 (timm ModelEma, both stages)"),
    "mixup": (0.8, f"{_CFG} --mixup 0.8 (timm Mixup, SoftTargetCrossEntropy in {_TRAIN})"),
    "cutmix": (1.0, f"{_CFG} --cutmix 1.0, --mixup-prob 1.0, --mixup-switch-prob 0.5, --mixup-mode batch"),
    "rand_augment": ("rand-m9-mstd0.5-inc1", f"{_CFG} --aa rand-m9-mstd0.5-inc1 (modeling/data.py build_transform)"),
    "reprob": (0.25, f"{_CFG} --reprob 0.25 --remode pixel --recount 1"),
    "repeated_aug": (True, f"{_CFG} --repeated-aug on (modeling/samplers.py RASampler, under --distributed only)"),
    "drop_path": (0.1, f"{_CFG} --drop-path 0.1 (create_model(drop_path_rate=...) in {_MAIN})"),
    "augment": (False, "replaced by DeiT's transforms (our Fashion-MNIST shift/flip is not in the public code)"),
    "stage1": ("joint", f"{_MAIN} train(): all replaced blocks trained in the student at once "
                        "(set_requires_grad 'attn': the FAR module but its post_proj = W_O)"),
    "block_loss": ("mse", f"{_TRAIN} train_model: sim_criterion = torch.nn.MSELoss() (ours: relative MSE)"),
    "ce_weight": (1.0, f"{_CFG} --cls-loss-weight 1.0, --train-loss combine"),
    "block_weight": (1.0, f"{_CFG} --sim-loss-weight 1.0"),
    "kd_weight": (0.0, f"{_TRAIN}: no logit distillation term anywhere"),
    "joint_epochs": (0.0, "no such phase in the public code"),
    "stage2_epochs": (100.0, f"{_CFG} --block-ft-epochs 100 (block-level fine-tune, --block-ft-mode full)"),
    "stage2_lr": (5e-5, f"{_CFG} --block-ft-lr 5e-5, scaled by --block-ft-batch-size / 512 in {_MAIN}"),
    "stage2_block_weight": (0.0, f"{_CFG} --block-ft-train-loss classification (CE only)"),
}

#: stage 1's default peak learning rate per mode (far.distill without a config: the "far" recipe;
#: `far distill` without --lr). An isolated block is a small problem of its own and learns much faster at a
#: larger step than a whole model: one epoch of the zoo teacher's hardest block reached isolated cosine
#: 0.854 / 0.887 / 0.903 / 0.916 / 0.920 / 0.910 at LR 3e-3 / 6e-3 / 1e-2 / 2e-2 / 4e-2 / 8e-2
#: (bench/sweep_block_distill.py). But the recurrent weights grow with the step: a full run at 4e-2 fell to
#: 49.6% on the emulator's 8-bit ADC, one at 1e-2 kept 84.0% (the 3e-3 model: 84.55%) with fidelity near the
#: 4e-2 run's (README "Faithful, but not on the crossbar"). The joint modes train the whole stream: 1e-3.
STAGE1_LR = {"isolated": 1e-2, "joint": 1e-3}
POLISH_IMAGES = 10_000  # training images a distill polish caches per block (far.methods.polish)

RECIPES = ("far", "paper")
TRAIN_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def preset(name: str) -> Dict[str, object]:
    """{option: value} of recipe `name` ("far": empty, today's defaults stand)."""
    if name not in RECIPES:
        raise ConfigError(f"recipe must be one of {', '.join(RECIPES)}, got {name!r}")
    return {} if name == "far" else {k: v for k, (v, _) in PAPER.items()}


def apply(name: str, config: TrainConfig, kwargs: Dict[str, object], explicit: Optional[Iterable[str]] = None,
          defaults: Optional[Dict[str, object]] = None) -> Tuple[TrainConfig, Dict[str, object], Dict[str, object]]:
    """(config, kwargs, record) with recipe `name` filled in.

    explicit: the options the caller set on purpose (they keep their values); None = every option whose
    value differs from its default (`defaults` for kwargs, TrainConfig() for config fields). record is the
    run metadata entry: {"name", "values" (every preset option as it ran), "explicit", "sources"}."""
    values = preset(name)
    base = TrainConfig()
    defaults = defaults or {}
    if explicit is None:
        explicit = {k for k in values if (getattr(config, k) != getattr(base, k) if k in TRAIN_FIELDS
                                          else k in kwargs and k in defaults and kwargs[k] != defaults[k])}
    explicit = set(explicit)
    unknown = set(values) - TRAIN_FIELDS - set(kwargs)
    if unknown:
        raise ConfigError(f"recipe {name}: options {sorted(unknown)} are not options of this method")
    changes = {k: v for k, v in values.items() if k not in explicit}
    config = dataclasses.replace(config, **{k: v for k, v in changes.items() if k in TRAIN_FIELDS})
    kwargs = {**kwargs, **{k: v for k, v in changes.items() if k not in TRAIN_FIELDS}}
    ran = {k: (getattr(config, k) if k in TRAIN_FIELDS else kwargs[k]) for k in values}
    record = {"name": name, "values": ran, "explicit": sorted(explicit & set(values)),
              "sources": {k: PAPER[k][1] for k in values}}
    return config, kwargs, record


def lr_record(config: TrainConfig, stage2_lr: float, world: int) -> Dict[str, float]:
    """The LRs as run (after the batch scaling), for the run metadata."""
    return {"stage1": effective_lr(config.lr, config, world), "stage2": effective_lr(stage2_lr, config, world),
            "scale_batch": config.lr_scale_batch, "global_batch": config.batch_size * world}


def describe() -> str:
    """The presets as a help text block: what "paper" sets, and from where."""
    w = max(len(k) for k in PAPER)
    lines = ["recipes (--recipe): far = the defaults shown with each option; paper = the FAR authors' public code:"]
    for k, (v, src) in PAPER.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):  # on/off flags: the flag that sets the value
            flag, v = (flag if v else "--no-" + k.replace("_", "-")), ""
        lines.append(f"  {flag.ljust(w + 5)} {str(v):<21} {src}")
    return "\n".join(lines)


__all__ = ["PAPER", "RECIPES", "STAGE1_LR", "apply", "describe", "lr_record", "preset"]
