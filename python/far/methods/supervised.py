"""Supervised training of a classifier with cross-entropy: training a teacher from scratch
(`far train-teacher`) and downstream fine-tuning (`far finetune`, a new classifier when the number
of classes differs). Modules in, module out.

Fine-tuning modes (the FAR authors' public code, modeling/architectures.py set_requires_grad with
mode="downstream" for full / FC / FC+head and mode="finetune" for head):
  full     every parameter;
  fc       the MLP ("fully connected") layers of every block (`blocks.<i>.mlp.*`: fc1, fc2) and the
           classifier; attention / FAR blocks, norms, embeddings stay frozen;
  fc+head  the public code's FC+head: the same parameters as fc (its two branches are identical in
           downstream mode: both make the MLPs and the classifier trainable); kept for its name;
  head     the classifier only (linear probe).
"""
from __future__ import annotations

import copy
from typing import Callable, List, Optional

import torch
import torch.nn as nn

from far.errors import ConfigError
from far.models import far_modules
from far.train import RunReport, Task, TrainConfig, run_metadata, setup_distributed, train


FINETUNE_MODES = ("full", "fc", "fc+head", "head")


def _is_classifier(model: nn.Module) -> Callable[[str], bool]:
    """name -> True for the parameters of the model's classifier (timm get_classifier())."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module) or not list(head.parameters()):
        raise ConfigError(f"{type(model).__name__} has no classifier with parameters (get_classifier()); "
                          "use --mode full")
    ids = {id(p) for p in head.parameters()}
    names = {n for n, p in model.named_parameters() if id(p) in ids}
    return lambda n: n in names


def finetune_parameters(model: nn.Module, mode: str) -> List[str]:
    """Names of the parameters fine-tuning `mode` trains (module docstring); ConfigError for an unknown mode
    or a model without the parts it needs."""
    if mode not in FINETUNE_MODES:
        raise ConfigError(f"finetune mode must be one of {', '.join(FINETUNE_MODES)}, got {mode!r}")
    names = [n for n, _ in model.named_parameters()]
    if mode == "full":
        return names
    head = _is_classifier(model)
    if mode == "head":
        return [n for n in names if head(n)]
    mlp = [n for n in names if n.startswith("blocks.") and ".mlp." in n]
    if not mlp:
        raise ConfigError(f"finetune mode {mode}: {type(model).__name__} has no blocks.<i>.mlp layers")
    return [n for n in names if head(n) or n in set(mlp)]


def train_classifier(model: nn.Module, train_data, *, eval_data=None, config: Optional[TrainConfig] = None,
                     device: Optional[str] = None, identity: Optional[dict] = None,
                     command: str = "train", inplace: bool = False,
                     trainable: Optional[List[str]] = None) -> nn.Module:
    """A copy of `model` (inplace=True: the model itself) with every parameter (or only those named in
    `trainable`; the rest stay bit-identical) trained with cross-entropy (AdamW, warm-up + cosine, label
    smoothing, EMA, and the DeiT options of far.train.TrainConfig), in eval mode, with `far_metadata` and
    `far_run` (see far.distill). identity: extra settings a resumed run must match, also recorded. Which
    parameters train is `trainable`'s choice, not the model's requires_grad flags; the flags are given back
    as they were (a parameter the model did not have before, e.g. a new classifier, requires grad)."""
    cfg = (config or TrainConfig()).validate()
    if not inplace:
        model = copy.deepcopy(model)
    d = setup_distributed(device)
    keep = None if trainable is None else set(trainable)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}  # the caller's, given back afterwards
    for n, p in model.named_parameters():
        p.requires_grad_(keep is None or n in keep)
    try:
        result = train(Task(model, cfg), train_data, eval_data, cfg, d, identity=identity, desc=command)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, True))
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
             identity: Optional[dict] = None, inplace: bool = False, mode: str = "full") -> nn.Module:
    """A copy of `model` (inplace=True: the model itself) fine-tuned on `train_data` with CE, first
    given a new classifier (initialized from config.seed) when `num_classes` differs from its own.
    mode: which parameters train: "full", "fc", "fc+head" or "head" (module docstring); the others keep
    their values exactly. Recorded in the metadata ("finetune_mode", "trained_parameters")."""
    if mode not in FINETUNE_MODES:
        raise ConfigError(f"finetune mode must be one of {', '.join(FINETUNE_MODES)}, got {mode!r}")
    cfg = (config or TrainConfig()).validate()
    if not inplace:
        model = copy.deepcopy(model)
    if num_classes is not None:
        torch.manual_seed(cfg.seed)  # a new classifier's initialization is part of the run
        new_head = retarget_classes(model, num_classes)
    else:
        new_head = False
    names = finetune_parameters(model, mode)
    count = sum(p.numel() for n, p in model.named_parameters() if n in set(names))
    ident = {**(identity or {}), "classes": getattr(model, "num_classes", None)}
    if mode != "full":
        ident["finetune_mode"] = mode  # part of a resumed run's identity (full: as before this option)
    model = train_classifier(model, train_data, eval_data=eval_data, config=cfg, device=device, identity=ident,
                             command="finetune", inplace=True, trainable=names)
    model.far_metadata["new_classifier"] = new_head
    model.far_metadata["finetune_mode"] = mode
    model.far_metadata["trained_parameters"] = count
    model.far_run.rows.insert(0, ("mode", f"{mode} ({count:,} parameters trained)"))
    model.far_run.rows.insert(0, ("classes", f"{model.num_classes} "
                                             f"({'new classifier' if new_head else 'classifier kept'})"))
    return model
