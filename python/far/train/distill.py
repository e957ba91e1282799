"""`far distill`: block-wise distillation of an attention teacher into its FAR student.

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
import os
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from far.train.common import datasets, finish, run_metadata
from far.train.engine import (Task, TrainConfig, TrainError, cleanup_distributed, join_histories,
                              setup_distributed, train)

FAR_OWN = ("pre_proj.", "w_ih", "w_hh", "b_ih", "b_hh", "head_proj_weight", "head_proj_bias")


def _attention_blocks(model: nn.Module) -> List[nn.Module]:
    """The token mixers (timm Attention or FARAttention) of `model`'s blocks, in order."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TrainError(f"{type(model).__name__} has no .blocks: distillation needs a timm ViT")
    mixers = [b.attn for b in blocks]
    if not mixers or not all(hasattr(m, "proj") for m in mixers):
        raise TrainError("every block's token mixer must have a .proj (W_O) to distil against")
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
            raise TrainError("a block's proj did not run during the forward pass")
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
            raise TrainError(f"loss weights must be >= 0 and not all 0, got ce {ce_weight}, cos {cos_weight}, "
                             f"kd {kd_weight}")
        if not kd_temperature > 0:
            raise TrainError(f"kd temperature must be > 0, got {kd_temperature}")
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
            raise TrainError("teacher and student have different numbers of blocks")
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


def make_student(teacher: nn.Module, hidden_sizes=None, init: str = "value") -> nn.Module:
    """A FAR copy of `teacher` (attention replaced, W_O and the rest copied)."""
    import far

    student = copy.deepcopy(teacher)
    far.convert(student, hidden_sizes=hidden_sizes, init=init)
    return student


def load_teacher(spec: str, device: torch.device) -> nn.Module:
    """A teacher from a checkpoint path (far.load), a zoo name, or a timm name with pretrained weights."""
    import far

    if os.path.exists(spec):
        model = far.load(spec)
    else:
        try:
            model = far.create_model(spec, pretrained=True, far=False)
        except Exception as e:  # noqa: BLE001 - no network, unknown name, ...
            raise TrainError(f"teacher '{spec}': not a file, and loading it as a pretrained model failed: "
                             f"{type(e).__name__}: {e}") from e
    if any(True for _ in far.far_modules(model)):
        raise TrainError(f"teacher '{spec}' is already a FAR model; distil from an attention model")
    return model.to(device).eval()


def load_student(spec: str, teacher: nn.Module) -> nn.Module:
    """An existing FAR student (checkpoint path or zoo name) to continue distilling from `teacher`."""
    import far

    try:
        model = far.load(spec) if os.path.exists(spec) else far.create_model(spec, pretrained=True)
    except Exception as e:  # noqa: BLE001 - corrupt file, unknown name, ...
        raise TrainError(f"student '{spec}': {type(e).__name__}: {e}") from e
    if not any(True for _ in far.far_modules(model)):
        raise TrainError(f"student '{spec}' has no FAR modules; pass a FAR checkpoint (far distill -o ...)")
    if len(_attention_blocks(model)) != len(_attention_blocks(teacher)):
        raise TrainError(f"student '{spec}' has {len(_attention_blocks(model))} blocks, the teacher "
                         f"{len(_attention_blocks(teacher))}")
    s_cls, t_cls = getattr(model, "num_classes", None), getattr(teacher, "num_classes", None)
    if s_cls != t_cls:
        raise TrainError(f"student '{spec}' predicts {s_cls} classes, the teacher {t_cls}")
    return model


def distill(teacher: str, data: str = "fashion-mnist", cfg: Optional[TrainConfig] = None,
            stage2_epochs: float = 1.0, stage2_lr: float = 2e-4, output: Optional[str] = None,
            device: Optional[str] = None, ce_weight: float = 1.0, cos_weight: float = 1.0,
            hidden_sizes=None, val: Optional[str] = None, kd_weight: float = 0.0,
            kd_temperature: float = 1.0, student: Optional[str] = None) -> dict:
    """Two-stage distillation; `cfg` drives stage 1 (its epochs, lr; 0 epochs = skip), stage 2 reuses it
    with `stage2_epochs` and `stage2_lr` (0 epochs = skip); kd_weight > 0 adds logit distillation to both.
    `student` (a FAR checkpoint or zoo name) starts from that student instead of converting the teacher,
    e.g. to continue distilling with more epochs. Run folders: <out_dir>/stage1, <out_dir>/stage2;
    --resume skips a finished stage 1 and continues the unfinished stage."""
    import dataclasses

    import far

    cfg = cfg or TrainConfig()
    skip1 = cfg.epochs == 0
    dataclasses.replace(cfg, epochs=1.0 if skip1 else cfg.epochs).validate()
    if stage2_epochs < 0:
        raise TrainError(f"stage 2 epochs must be >= 0, got {stage2_epochs}")
    if skip1 and stage2_epochs == 0:
        raise TrainError("both stages have 0 epochs: nothing to train")
    if student is not None and hidden_sizes is not None:
        raise TrainError("--hidden-size sizes a new student; an existing --student keeps its own sizes")
    d = setup_distributed(device)
    try:
        t_model = load_teacher(teacher, d.device)
        torch.manual_seed(cfg.seed)  # the LSTMs' initialization is part of the run
        if student is not None:
            s_model = load_student(student, t_model)
        else:
            s_model = make_student(t_model.cpu(), hidden_sizes=hidden_sizes)
        t_model.to(d.device)
        student_spec, student = student, s_model
        train_set, eval_set = datasets(data, student, cfg, val)
        root = Path(cfg.out_dir)
        stage1_model = root / "stage1" / "model.safetensors"
        ident = {"teacher": os.path.abspath(teacher) if os.path.exists(teacher) else teacher, "data": str(data),
                 "ce_weight": ce_weight, "cos_weight": cos_weight}
        if kd_weight > 0:  # only then, so runs without KD keep the identity they always had (resume)
            ident.update(kd_weight=kd_weight, kd_temperature=kd_temperature)
        if student_spec is not None:
            ident["student"] = os.path.abspath(student_spec) if os.path.exists(student_spec) else student_spec
        seconds = 0.0
        if skip1:
            r1 = None
        elif cfg.resume and stage1_model.is_file():
            student = far.load(stage1_model)
            r1 = None
        else:
            c1 = _stage_cfg(cfg, root / "stage1", cfg.epochs, cfg.lr, resume=cfg.resume)
            task = DistillTask(student, t_model, c1, stage=1, ce_weight=ce_weight, cos_weight=cos_weight,
                               kd_weight=kd_weight, kd_temperature=kd_temperature)
            r1 = train(task, train_set, eval_set, c1, d, identity=ident, desc="distill stage 1")
            task.s_hooks.remove()
            task.t_hooks.remove()
            seconds += r1.seconds
            if not r1.completed:
                return finish(r1.model, None, cfg, d, r1, "distill", "distill stage 1", [], {})
            if d.main:
                far.save(r1.model, stage1_model, metadata={"stage": 1})
            d.barrier()
            student = r1.model
        result, stage_cfg = r1, None
        if stage2_epochs > 0:
            c2 = _stage_cfg(cfg, root / "stage2", stage2_epochs, stage2_lr,
                            resume=cfg.resume and (root / "stage2" / "last.pt").is_file())
            c2.warmup_epochs = min(cfg.warmup_epochs, stage2_epochs / 4)
            task = DistillTask(student, t_model, c2, stage=2, ce_weight=1.0, cos_weight=0.0, kd_weight=kd_weight,
                               kd_temperature=kd_temperature)
            result = train(task, train_set, eval_set, c2, d, identity={**ident, "stage": 2}, desc="distill stage 2")
            task.s_hooks.remove()
            task.t_hooks.remove()
            seconds += result.seconds
            stage_cfg = c2
        if result is None:  # resumed with stage 1 done and no stage 2: evaluate what we have
            from far.train.engine import TrainResult, evaluate

            acc = evaluate(student.to(d.device), eval_set, cfg.eval_batch_size, d) if eval_set is not None else None
            result = TrainResult(student, [], acc, 0.0, 0, root, True)
        result.seconds = seconds if seconds else result.seconds
        t_acc = None
        if eval_set is not None:
            from far.train.engine import evaluate

            t_acc = evaluate(t_model, eval_set, cfg.eval_batch_size, d)
        fcfg = stage_cfg or cfg
        meta = run_metadata("distill", cfg, d, result, teacher=ident["teacher"], data=str(data),
                            teacher_test_accuracy=t_acc,
                            distill={"stage1_epochs": cfg.epochs, "stage1_lr": cfg.lr, "stage2_epochs": stage2_epochs,
                                     "stage2_lr": stage2_lr, "ce_weight": ce_weight, "cos_weight": cos_weight,
                                     "kd_weight": kd_weight, "kd_temperature": kd_temperature,
                                     "student": ident.get("student")})
        lstm = sum(m.num_lstm_params() for _, m in far.far_modules(result.model))
        rows = [("teacher top-1", f"{100 * t_acc:.2f}%" if t_acc is not None else "n/a"),
                ("FAR parameters", f"{sum(p.numel() for p in result.model.parameters()):,}"),
                ("LSTM + head_proj params", f"{lstm:,}"), ("processes", str(d.world))]
        fcfg_out = _stage_cfg(fcfg, root, fcfg.epochs, fcfg.lr, fcfg.resume)
        parts = [r.history for r in ((r1, result) if result is not r1 else (r1,)) if r is not None]
        result.history = join_histories(*parts)
        return finish(result.model, output, fcfg_out, d, result, "distill", f"FAR student of {teacher}", rows, meta,
                      logs=os.fspath(root / "stage{1,2}" / "metrics.jsonl"))
    finally:
        cleanup_distributed()


def _stage_cfg(cfg: TrainConfig, out_dir: Path, epochs: float, lr: float, resume: bool) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(cfg, out_dir=os.fspath(out_dir), epochs=epochs, lr=lr,
                               min_lr=min(cfg.min_lr, lr), resume=resume)
