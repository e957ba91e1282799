"""Supervised training of a classifier with cross-entropy: training a teacher from scratch
(`far train-teacher`) and downstream fine-tuning (`far finetune`, a new classifier when the number
of classes differs). Modules in, module out."""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn

from far.errors import ConfigError
from far.models import far_modules
from far.train import RunReport, Task, TrainConfig, run_metadata, setup_distributed, train


def train_classifier(model: nn.Module, train_data, *, eval_data=None, config: Optional[TrainConfig] = None,
                     device: Optional[str] = None, identity: Optional[dict] = None,
                     command: str = "train", inplace: bool = False) -> nn.Module:
    """A copy of `model` (inplace=True: the model itself) with every parameter trained with
    cross-entropy (AdamW, warm-up + cosine, label smoothing, EMA: far.train.TrainConfig), in eval
    mode, with `far_metadata` and `far_run` (see far.distill). identity: extra settings a resumed
    run must match, also recorded."""
    cfg = (config or TrainConfig()).validate()
    if not inplace:
        model = copy.deepcopy(model)
    d = setup_distributed(device)
    for p in model.parameters():
        p.requires_grad_(True)
    result = train(Task(model, cfg), train_data, eval_data, cfg, d, identity=identity, desc=command)
    model = result.model
    model.far_metadata = run_metadata(command, cfg, d, result, **(identity or {}))
    model.far_run = RunReport(command, result.history, result.final_accuracy, result.seconds, result.steps,
                              result.completed, cfg.out_dir,
                              rows=[("parameters", f"{sum(p.numel() for p in model.parameters()):,}"),
                                    ("FAR blocks", str(len(far_modules(model)))), ("processes", str(d.world))])
    return model.eval()


def retarget_classes(model: nn.Module, num_classes: int) -> bool:
    """Give `model` a fresh classifier for `num_classes` (timm reset_classifier); keep far_arch and
    pretrained_cfg consistent so far.save/far.load rebuild it. Returns True if it changed."""
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    if getattr(model, "num_classes", None) == num_classes:
        return False
    if not hasattr(model, "reset_classifier"):
        raise ConfigError(f"{type(model).__name__} has no reset_classifier(); cannot change its classes")
    model.reset_classifier(num_classes)
    arch = dict(getattr(model, "far_arch", {}) or {})
    kwargs = dict(arch.get("kwargs", {}))
    kwargs["num_classes"] = num_classes
    arch["kwargs"] = kwargs
    model.far_arch = arch
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    cfg["num_classes"] = num_classes
    model.pretrained_cfg = cfg
    return True


def finetune(model: nn.Module, train_data, *, num_classes: Optional[int] = None, eval_data=None,
             config: Optional[TrainConfig] = None, device: Optional[str] = None,
             identity: Optional[dict] = None, inplace: bool = False) -> nn.Module:
    """A copy of `model` (inplace=True: the model itself) fine-tuned on `train_data` with CE, first
    given a new classifier (initialized from config.seed) when `num_classes` differs from its own."""
    cfg = (config or TrainConfig()).validate()
    if not inplace:
        model = copy.deepcopy(model)
    if num_classes is not None:
        torch.manual_seed(cfg.seed)  # a new classifier's initialization is part of the run
        new_head = retarget_classes(model, num_classes)
    else:
        new_head = False
    model = train_classifier(model, train_data, eval_data=eval_data, config=cfg, device=device,
                             identity={**(identity or {}), "classes": getattr(model, "num_classes", None)},
                             command="finetune", inplace=True)
    model.far_metadata["new_classifier"] = new_head
    model.far_run.rows.insert(0, ("classes", f"{model.num_classes} "
                                             f"({'new classifier' if new_head else 'classifier kept'})"))
    return model
