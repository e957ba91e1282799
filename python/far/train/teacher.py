"""`far train-teacher`: train a DeiT-style timm ViT (the attention teacher) from scratch."""
from __future__ import annotations

import torch

from typing import Optional

from far.train.common import datasets, finish, run_metadata
from far.train.engine import Task, TrainConfig, TrainError, cleanup_distributed, setup_distributed, train


def train_teacher(model_name: str = "fmnist_deit_tiny", data: str = "fashion-mnist", cfg: Optional[TrainConfig] = None,
                  output: Optional[str] = None, device: Optional[str] = None, drop_path: float = 0.0,
                  val: Optional[str] = None, num_classes: Optional[int] = None) -> dict:
    """Train timm model `model_name` (attention, not converted) on `data` with cross-entropy.

    Returns the run summary (test accuracy, time, output path); saves `output` with far.save.
    """
    import far

    cfg = (cfg or TrainConfig()).validate()
    if not 0 <= drop_path < 1:
        raise TrainError(f"drop path must be in [0, 1), got {drop_path}")
    d = setup_distributed(device)
    try:
        kw = {} if num_classes is None else {"num_classes": num_classes}
        torch.manual_seed(cfg.seed)  # the initialization is part of the run
        try:
            model = far.create_model(model_name, far=False, drop_path_rate=drop_path, **kw)
        except (ValueError, RuntimeError) as e:
            raise TrainError(str(e)) from e
        model.far_arch = {"timm_name": model_name, "kwargs": kw}  # drop_path is training-only
        train_set, eval_set = datasets(data, model, cfg, val)
        result = train(Task(model, cfg), train_set, eval_set, cfg, d,
                       identity={"model": model_name, "data": str(data), "drop_path": drop_path}, desc="teacher")
        params = sum(p.numel() for p in result.model.parameters())
        meta = run_metadata("train-teacher", cfg, d, result, data=str(data))
        return finish(result.model, output, cfg, d, result, "train-teacher", f"teacher {model_name} on {data}",
                      [("model", model_name), ("parameters", f"{params:,}"), ("processes", str(d.world))], meta)
    finally:
        cleanup_distributed()
