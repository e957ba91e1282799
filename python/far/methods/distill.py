"""far.distill: block-wise distillation of an attention teacher into its FAR student. Modules in,
module out; the losses, hooks and the student's construction are usable on their own.

Student = the teacher with every attention replaced by FARAttention (far.convert, pre_proj from the
value projection, W_O = the attention's own proj). Stage 1 trains only the new modules (pre_proj,
the LSTMs, head_proj; W_O and everything else frozen) with
    loss = ce_weight * CE + cos_weight * sum_blocks mean_{b,c} (1 - cos_N(s[b, :, c], t[b, :, c]))
where s is a FAR module's output after head_proj (the input of its proj) and t the teacher attention's
output before W_O (the input of the teacher's proj), the cosine taken along the token axis N per
channel. Stage 2 fine-tunes the whole student with CE. Optionally (kd_weight > 0, both stages) a
logit-distillation term kd_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)) pulls the
student's predictions toward the teacher's: the point of FAR is to preserve the teacher's function.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from far.errors import ConfigError
from far.evaluate import accuracy
from far.models import convert, far_modules, save
from far.train import (RunReport, Task, TrainConfig, TrainResult, join_histories, run_metadata, setup_distributed,
                       stage_config, train)

FAR_OWN = ("pre_proj.", "w_ih", "w_hh", "b_ih", "b_hh", "head_proj_weight", "head_proj_bias")


def _attention_blocks(model: nn.Module) -> List[nn.Module]:
    """The token mixers (timm Attention or FARAttention) of `model`'s blocks, in order."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError(f"{type(model).__name__} has no .blocks: distillation needs a timm ViT")
    mixers = [b.attn for b in blocks]
    if not mixers or not all(hasattr(m, "proj") for m in mixers):
        raise ConfigError("every block's token mixer must have a .proj (W_O) to distil against")
    return mixers


class ProjInputs:
    """Captures the input of each block's W_O (`attn.proj`) during a forward pass: for timm
    Attention the attention output before W_O, for FARAttention the output after head_proj."""

    def __init__(self, model: nn.Module):
        self.values: List[Optional[torch.Tensor]] = []
        self.handles = []
        for i, m in enumerate(_attention_blocks(model)):
            self.values.append(None)
            self.handles.append(m.proj.register_forward_pre_hook(self._hook(i)))

    def _hook(self, i: int):
        def hook(module, args):
            self.values[i] = args[0]
        return hook

    def take(self) -> List[torch.Tensor]:
        vals, self.values = self.values, [None] * len(self.values)
        if any(v is None for v in vals):
            raise RuntimeError("a block's proj did not run during the forward pass")
        return vals

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def cosine_token_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """mean over (batch, channel) of 1 - cosine similarity along the token axis: s, t [B, N, C]."""
    return (1.0 - F.cosine_similarity(s.float(), t.float(), dim=1, eps=1e-6)).mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(t / T) || softmax(s / T)), averaged over the batch (Hinton et al. 2015): 0 iff the
    two predictive distributions agree; the T^2 keeps its gradient scale independent of T."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature ** 2


class DistillTask(Task):
    """Stage 1 (`stage=1`): only the FAR modules' own parameters train, loss = CE + cosine terms.
    Stage 2: every parameter trains with CE (cos_weight applies too if > 0). kd_weight > 0 adds
    the logit-distillation term (kd_loss at kd_temperature) in either stage."""

    name = "distill"

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: TrainConfig, stage: int,
                 ce_weight: float = 1.0, cos_weight: float = 1.0, kd_weight: float = 0.0,
                 kd_temperature: float = 1.0):
        super().__init__(student, cfg)
        if min(ce_weight, cos_weight, kd_weight) < 0 or ce_weight + cos_weight + kd_weight == 0:
            raise ConfigError(f"loss weights must be >= 0 and not all 0, got ce {ce_weight}, cos {cos_weight}, "
                              f"kd {kd_weight}")
        if not kd_temperature > 0:
            raise ConfigError(f"kd temperature must be > 0, got {kd_temperature}")
        self.name = f"distill-stage{stage}"
        self.stage = stage
        self.ce_weight, self.cos_weight = ce_weight, cos_weight
        self.kd_weight, self.kd_temperature = kd_weight, kd_temperature
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        far_mods = {id(m) for m in _attention_blocks(student)}
        for name, p in student.named_parameters():
            p.requires_grad_(stage == 2)
        if stage == 1:
            for m in _attention_blocks(student):
                if id(m) in far_mods:
                    for name, p in m.named_parameters():
                        if name.startswith(FAR_OWN):
                            p.requires_grad_(True)
        if len(_attention_blocks(student)) != len(_attention_blocks(teacher)):
            raise ConfigError("teacher and student have different numbers of blocks")
        self.s_hooks = ProjInputs(student)
        self.t_hooks = ProjInputs(teacher)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        need_cos = self.cos_weight > 0
        if need_cos or self.kd_weight > 0:
            with torch.no_grad():
                t_logits = self.teacher(x)
            t_feats = self.t_hooks.take()
        logits = model(x)
        s_feats = self.s_hooks.take()
        ce = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        loss = self.ce_weight * ce
        out["ce"] = ce.detach()
        if need_cos:
            cos = [cosine_token_loss(s, t) for s, t in zip(s_feats, t_feats)]
            total = torch.stack(cos).sum()
            loss = loss + self.cos_weight * total
            out["cos"] = total.detach()
            for i, c in enumerate(cos):
                out[f"cos_b{i}"] = c.detach()
        if self.kd_weight > 0:
            kd = kd_loss(logits, t_logits, self.kd_temperature)
            loss = loss + self.kd_weight * kd
            out["kd"] = kd.detach()
        out["loss"] = loss
        return out

    def remove_hooks(self) -> None:
        self.s_hooks.remove()
        self.t_hooks.remove()


def make_student(teacher: nn.Module, hidden_sizes=None, init: str = "value") -> nn.Module:
    """A FAR copy of `teacher` (attention replaced, W_O and the rest copied; the teacher is untouched)."""
    student = copy.deepcopy(teacher)
    convert(student, hidden_sizes=hidden_sizes, init=init)
    student.far_metadata = {}
    return student


def check_student(student: nn.Module, teacher: nn.Module) -> None:
    """ConfigError unless `student` is a FAR model with the teacher's blocks and classes."""
    if not far_modules(student):
        raise ConfigError("the student has no FAR modules; pass a FAR model (far.distill makes one)")
    if len(_attention_blocks(student)) != len(_attention_blocks(teacher)):
        raise ConfigError(f"the student has {len(_attention_blocks(student))} blocks, the teacher "
                          f"{len(_attention_blocks(teacher))}")
    s_cls, t_cls = getattr(student, "num_classes", None), getattr(teacher, "num_classes", None)
    if s_cls != t_cls:
        raise ConfigError(f"the student predicts {s_cls} classes, the teacher {t_cls}")


def distill(teacher: nn.Module, train_data, *, student: Optional[nn.Module] = None, eval_data=None,
            config: Optional[TrainConfig] = None, stage2_epochs: float = 1.0, stage2_lr: float = 2e-4,
            ce_weight: float = 1.0, cos_weight: float = 1.0, kd_weight: float = 0.0, kd_temperature: float = 1.0,
            hidden_sizes=None, device: Optional[str] = None, identity: Optional[dict] = None) -> nn.Module:
    """Distil `teacher` (an attention ViT) into a FAR student and return the student. Neither the
    teacher nor a given student is changed: the student trained is a copy, and the teacher's device,
    train/eval mode and requires_grad flags are restored afterwards.

    Args:
        teacher: the attention model (left unchanged).
        train_data / eval_data: datasets of (image, label); eval_data (optional) is tested after each epoch.
        student: a FAR model to continue from (default: far.convert of a copy of the teacher, LSTMs
            initialized from config.seed, pre_proj from the value projection).
        config: the training options of stage 1 (its epochs and lr; epochs 0 skips stage 1); stage 2
            reuses them with stage2_epochs and stage2_lr (0 epochs skips it). config.out_dir None
            writes nothing; with a folder, <out_dir>/stage1 and <out_dir>/stage2 hold each stage's
            resumable state and metrics, and config.resume continues an interrupted run.
        ce_weight, cos_weight: stage 1 loss weights; kd_weight, kd_temperature: logit distillation
            in both stages (0 = off).
        hidden_sizes: LSTM units of a new student (int or one [2, H] per block).
        device: cpu, cuda, cuda:N (default: the process's GPU under torchrun, else cuda if present, else cpu).
        identity: extra settings a resumed run must match (e.g. the teacher's file and the data's name).
    Returns:
        the student (eval mode), with `far_metadata` (the record far.save stores) and `far_run` (a
        far.train.RunReport: history, accuracy, seconds, completed; completed False when
        config.max_steps stopped it, to be resumed).
    """
    cfg = config or TrainConfig()
    skip1 = cfg.epochs == 0
    dataclasses.replace(cfg, epochs=1.0 if skip1 else cfg.epochs).validate()
    if stage2_epochs < 0:
        raise ConfigError(f"stage 2 epochs must be >= 0, got {stage2_epochs}")
    if skip1 and stage2_epochs == 0:
        raise ConfigError("both stages have 0 epochs: nothing to train")
    if student is not None and hidden_sizes is not None:
        raise ConfigError("hidden_sizes sizes a new student; an existing student keeps its own sizes")
    if far_modules(teacher):
        raise ConfigError("the teacher is already a FAR model; distil from an attention model")
    saved = _teacher_state(teacher)
    try:
        return _distill(teacher, train_data, student, eval_data, cfg, skip1, stage2_epochs, stage2_lr, ce_weight,
                        cos_weight, kd_weight, kd_temperature, hidden_sizes, device, identity)
    finally:
        _restore_teacher(teacher, saved)


def _teacher_state(teacher: nn.Module) -> tuple:
    """(device, training, requires_grad per parameter): what distillation changes on the teacher."""
    p = next(teacher.parameters(), None)
    return (p.device if p is not None else None, teacher.training, [q.requires_grad for q in teacher.parameters()])


def _restore_teacher(teacher: nn.Module, saved: tuple) -> None:
    device, training, grads = saved
    if device is not None:
        teacher.to(device)
    teacher.train(training)
    for q, g in zip(teacher.parameters(), grads):
        q.requires_grad_(g)


def _distill(teacher, train_data, student, eval_data, cfg, skip1, stage2_epochs, stage2_lr, ce_weight, cos_weight,
             kd_weight, kd_temperature, hidden_sizes, device, identity) -> nn.Module:
    d = setup_distributed(device)
    teacher = teacher.to(d.device).eval()
    torch.manual_seed(cfg.seed)  # the LSTMs' initialization is part of the run
    if student is None:
        student = make_student(teacher.cpu(), hidden_sizes=hidden_sizes)
        teacher.to(d.device)
        continued = False
    else:
        check_student(student, teacher)
        student = copy.deepcopy(student)
        continued = True
    ident = {**(identity or {}), "ce_weight": ce_weight, "cos_weight": cos_weight}
    if kd_weight > 0:  # only then, so runs without KD keep the identity they always had (resume)
        ident.update(kd_weight=kd_weight, kd_temperature=kd_temperature)
    stage1_file = None if cfg.out_dir is None else os.path.join(cfg.out_dir, "stage1", "model.safetensors")
    r1 = result = None
    if not skip1 and cfg.resume and stage1_file is not None and os.path.isfile(stage1_file):
        from far.models import load

        student = load(stage1_file).to(d.device)  # stage 1 finished in an earlier run
    elif not skip1:
        c1 = stage_config(cfg, "stage1", min_lr=min(cfg.min_lr, cfg.lr))
        task = DistillTask(student, teacher, c1, stage=1, ce_weight=ce_weight, cos_weight=cos_weight,
                           kd_weight=kd_weight, kd_temperature=kd_temperature)
        try:
            r1 = result = train(task, train_data, eval_data, c1, d, identity=ident, desc="distill stage 1")
        finally:
            task.remove_hooks()
        student = r1.model
        if r1.completed and stage1_file is not None and d.main:
            save(student, stage1_file, metadata={"stage": 1})
        d.barrier()
    if stage2_epochs > 0 and (r1 is None or r1.completed):
        c2 = stage_config(cfg, "stage2", epochs=stage2_epochs, lr=stage2_lr, min_lr=min(cfg.min_lr, stage2_lr),
                          warmup_epochs=min(cfg.warmup_epochs, stage2_epochs / 4))
        task = DistillTask(student, teacher, c2, stage=2, ce_weight=1.0, cos_weight=0.0, kd_weight=kd_weight,
                           kd_temperature=kd_temperature)
        try:
            result = train(task, train_data, eval_data, c2, d, identity={**ident, "stage": 2},
                           desc="distill stage 2")
        finally:
            task.remove_hooks()
        student = result.model
    if result is None:  # resumed with stage 1 done and no stage 2: report what we have
        result = TrainResult(student, [], accuracy(student, eval_data, batch_size=cfg.eval_batch_size,
                                                   device=d.device), 0.0, 0, None, True)
    t_acc = accuracy(teacher, eval_data, batch_size=cfg.eval_batch_size, device=d.device)
    seconds = (r1.seconds if r1 is not None else 0.0) + (result.seconds if result is not r1 else 0.0)
    histories = [r.history for r in ((r1, result) if result is not r1 else (r1,)) if r is not None]
    done = TrainResult(student, join_histories(*histories), result.final_accuracy, seconds,
                       (r1.steps if r1 is not None else 0) + (result.steps if result is not r1 else 0),
                       None, result.completed)
    student.far_metadata = run_metadata(
        "distill", cfg, d, done, teacher_test_accuracy=t_acc, **{k: v for k, v in (identity or {}).items()},
        distill={"stage1_epochs": cfg.epochs, "stage1_lr": cfg.lr, "stage2_epochs": stage2_epochs,
                 "stage2_lr": stage2_lr, "ce_weight": ce_weight, "cos_weight": cos_weight, "kd_weight": kd_weight,
                 "kd_temperature": kd_temperature, "continued": continued})
    lstm = sum(m.num_lstm_params() for _, m in far_modules(student))
    student.far_run = RunReport(
        "distill", done.history, done.final_accuracy, seconds, done.steps, done.completed, cfg.out_dir,
        rows=[("teacher top-1", f"{100 * t_acc:.2f}%" if t_acc is not None else "n/a"),
              ("FAR parameters", f"{sum(p.numel() for p in student.parameters()):,}"),
              ("LSTM + head_proj params", f"{lstm:,}"), ("processes", str(d.world))])
    return student.eval()
