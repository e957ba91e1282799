"""`far finetune`: downstream fine-tuning of a checkpoint (the paper's transfer experiments)."""
from __future__ import annotations

import torch

import os
from pathlib import Path
from typing import Optional

from far.train.engine import Task, TrainConfig, TrainError, cleanup_distributed, setup_distributed, train


def _folder_classes(path: str) -> int:
    p = Path(path)
    if not p.is_dir():
        raise TrainError(f"{path}: no such image folder")
    n = sum(1 for c in p.iterdir() if c.is_dir())
    if n < 2:
        raise TrainError(f"{path}: needs at least 2 class subfolders, found {n}")
    return n


def retarget_classes(model, num_classes: int) -> bool:
    """Give `model` a fresh classifier for `num_classes` (timm reset_classifier); keep far_arch and
    pretrained_cfg consistent so far.save/far.load rebuild it. Returns True if it changed."""
    if num_classes < 2:
        raise TrainError(f"num_classes must be >= 2, got {num_classes}")
    if getattr(model, "num_classes", None) == num_classes:
        return False
    if not hasattr(model, "reset_classifier"):
        raise TrainError(f"{type(model).__name__} has no reset_classifier(); cannot change its classes")
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


def finetune(checkpoint: str, data: str, cfg: Optional[TrainConfig] = None, output: Optional[str] = None,
             device: Optional[str] = None, val: Optional[str] = None, num_classes: Optional[int] = None) -> dict:
    """Fine-tune every parameter of `checkpoint` on `data` with CE; new classifier if the class count differs."""
    import far
    from far.train.common import datasets, finish, run_metadata

    cfg = (cfg or TrainConfig()).validate()
    if not os.path.exists(checkpoint):
        raise TrainError(f"{checkpoint}: no such checkpoint")
    d = setup_distributed(device)
    try:
        model = far.load(checkpoint)
        is_fmnist = str(data).lower() in ("fashion-mnist", "fashion_mnist", "fmnist")
        k = num_classes if num_classes is not None else (10 if is_fmnist else _folder_classes(data))
        torch.manual_seed(cfg.seed)  # a new classifier's initialization is part of the run
        new_head = retarget_classes(model, k)
        for p in model.parameters():
            p.requires_grad_(True)
        train_set, eval_set = datasets(data, model, cfg, val)
        result = train(Task(model, cfg), train_set, eval_set, cfg, d,
                       identity={"checkpoint": os.path.abspath(checkpoint), "data": str(data), "classes": k},
                       desc="finetune")
        meta = run_metadata("finetune", cfg, d, result, source=os.path.abspath(checkpoint), data=str(data),
                            new_classifier=new_head)
        return finish(result.model, output, cfg, d, result, "finetune", f"{checkpoint} fine-tuned on {data}",
                      [("classes", f"{k} ({'new classifier' if new_head else 'classifier kept'})"),
                       ("FAR blocks", str(sum(1 for _ in far.far_modules(result.model)))),
                       ("processes", str(d.world))], meta)
    finally:
        cleanup_distributed()
