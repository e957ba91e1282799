"""far.distill: block-wise distillation of an attention teacher into its FAR student. Modules in,
module out; the losses, tasks and the student's construction are usable on their own.

Student = the teacher with every attention replaced by FARAttention (far.convert: pre_proj from the
value projection, W_O = the attention's own proj). Every block's target is the teacher attention's
output before W_O (t), every FAR block's output is the input of its proj (s, FARAttention.token_mix),
and `block_loss` compares them: "cos" (1 - cosine along the token axis, per channel: the paper's),
"mse" (relative squared error: sum (s - t)^2 / sum t^2, which sees magnitude) or "cos+mse".

Stages (each its own run folder under config.out_dir):
  stage 1  "isolated" (default): every FAR block is trained on the teacher's own block input (taps on
           the frozen teacher), so the blocks are independent problems — no block waits for an earlier
           one to converge, and nothing depends on the labels. "joint": the paper's mode, all blocks in
           the student at once, CE + block losses (W_O and everything outside the FAR blocks frozen).
  polish   optional (polish_iters): every FAR block alone again, by full-batch L-BFGS on its teacher block's
           inputs and outputs cached for polish_images training images (far.methods.polish), from where
           stage 1 left it (or from the student given, with 0 stage-1 epochs).
  joint    optional (joint_epochs): the student's own stream, FAR blocks only, block losses + CE/KD:
           the composition of blocks trained in isolation.
  stage 2  every parameter: ce_weight * CE + kd_weight * T^2 KL(teacher || student at temperature T)
           + stage2_block_weight * sum of block losses in the model (keeps the blocks faithful).
labels=False: no cross-entropy anywhere (stage 1 isolated needs no labels; stage 2 learns from the
teacher's outputs), for a plain folder of images.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import time
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from far.errors import ConfigError
from far.utils.checks import finite_number
from far.evaluate import accuracy
from far.fidelity import block_fidelity
from far.methods.polish import POLISH_IMAGES, check_polish, polish_blocks
from far.methods.recipes import STAGE1_LR
from far.models import convert, far_modules, save, stored_tensors
from far.models.convert import PRE_PROJ_INITS, parse_blocks
from far.nn import FARAttention, MixerTaps, token_mixers
from far.train import (RunReport, Task, TrainConfig, TrainResult, join_histories, run_metadata, setup_distributed,
                       stage_config, train)
from far.train.loop import (check_fresh_run, check_resumable, classification_loss, finished_stage_record,
                            limit_data, load_finished_stage, stage_identity, stage_record)

FAR_OWN = ("pre_proj.", "w_ih", "w_hh", "b_ih", "b_hh", "head_proj_weight", "head_proj_bias",  # padded storage
           "lstm.", "head_proj.")  # ragged storage
BLOCK_LOSSES = ("cos", "mse", "cos+mse")
STAGE1_MODES = ("isolated", "joint")


# ---------------------------------------------------------------- losses
def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32 or wider: bf16 / fp16 upcast, float64 kept (a float64 model's losses stay float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def cosine_token_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """mean over (batch, channel) of 1 - cosine similarity along the token axis: s, t [B, N, C]."""
    return (1.0 - F.cosine_similarity(_wide(s), _wide(t), dim=1, eps=1e-6)).mean()


def relative_mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """sum (s - t)^2 / sum t^2 over the batch: 0 iff s == t, 1 for s = 0; independent of the target's scale,
    so blocks of different magnitudes weigh alike."""
    s, t = _wide(s), _wide(t)
    return (s - t).square().sum() / t.square().sum().clamp_min(1e-12)


def block_loss(s: torch.Tensor, t: torch.Tensor, kind: str = "cos+mse") -> Dict[str, torch.Tensor]:
    """{"cos": ..., "mse": ...} (the terms `kind` uses) for one block's output s and target t [B, N, C]."""
    if kind not in BLOCK_LOSSES:
        raise ConfigError(f"block loss must be one of {', '.join(BLOCK_LOSSES)}, got {kind!r}")
    out = {}
    if "cos" in kind:
        out["cos"] = cosine_token_loss(s, t)
    if "mse" in kind:
        out["mse"] = relative_mse(s, t)
    return out


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(t / T) || softmax(s / T)), averaged over the batch (Hinton et al. 2015): 0 iff the
    two predictive distributions agree; the T^2 keeps its gradient scale independent of T."""
    log_p_s = F.log_softmax(_wide(student_logits) / temperature, dim=-1)
    log_p_t = F.log_softmax(_wide(teacher_logits) / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature ** 2


def _add_block_terms(out: Dict[str, torch.Tensor], s_feats, t_feats, kind: str, blocks: List[int]) -> torch.Tensor:
    """Sum of every block's loss terms; logs per-block terms (cos_b<i>, mse_b<i>, ... with i the model's block
    index, of `blocks`, the blocks the features come from) and totals into `out`."""
    total = 0.0
    for i, s, t in zip(blocks, s_feats, t_feats):
        for name, v in block_loss(s, t, kind).items():
            total = total + v
            out[f"{name}_b{i}"] = v.detach()
            out[name] = out.get(name, 0.0) + v.detach()
    return total


def _check_weights(**weights: float) -> None:
    bad = {k: v for k, v in weights.items() if v < 0}
    if bad or sum(weights.values()) == 0:
        raise ConfigError("loss weights must be >= 0 and not all 0, got "
                          + ", ".join(f"{k.replace('_weight', '')} {v}" for k, v in weights.items()))


# ---------------------------------------------------------------- tasks
def far_block_indices(model: nn.Module) -> List[int]:
    """Indices of the blocks whose token mixer is a FARAttention (every block, or some: far.convert(blocks=...))."""
    return [i for i, m in enumerate(token_mixers(model)) if isinstance(m, FARAttention)]


def _check_images(teacher: nn.Module, data, what: str) -> None:
    """ConfigError when the first image of `data` does not fit the teacher (far.models.check_input)."""
    from far.models.factory import check_input

    try:
        x = data[0][0]
    except Exception:  # noqa: BLE001 - an iterable dataset, or one without items: the model will say
        return
    if isinstance(x, torch.Tensor):
        check_input(teacher, x.shape, what)


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class IsolatedBlocks(nn.Module):
    """The student's FAR blocks as one module: forward(inputs) = [block_b.token_mix(inputs[b])]. Shares
    the blocks (and so their parameters) with the student."""

    def __init__(self, mixers: List[FARAttention]):
        super().__init__()
        self.blocks = nn.ModuleList(mixers)

    def forward(self, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
        return [m.token_mix(a) for m, a in zip(self.blocks, inputs)]


class IsolatedTask(Task):
    """Stage 1, isolated: each FAR block learns its teacher block from the teacher's own block inputs.
    loss = sum over blocks of block_loss(FAR block(teacher input), teacher output before W_O). Blocks are
    independent problems: one optimizer, but no gradient flows between blocks and each block's
    gradient is clipped on its own, so a block follows exactly the path it would follow trained alone."""

    name = "distill-isolated"

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: TrainConfig, kind: str = "cos+mse"):
        mixers = token_mixers(student)
        self.far_idx = far_block_indices(student)  # a partial student: only its FAR blocks train
        if not self.far_idx:
            raise ConfigError("isolated distillation needs a student with FAR blocks")
        mixers = [mixers[i] for i in self.far_idx]
        if len(token_mixers(student)) != len(token_mixers(teacher)):
            raise ConfigError("teacher and student have different numbers of blocks")
        block_loss(torch.ones(1, 1, 1), torch.ones(1, 1, 1), kind)  # validates the kind
        super().__init__(IsolatedBlocks(mixers), cfg)
        self.student = student
        self.kind = kind
        self.teacher = _freeze(teacher)
        for name, p in self.model.named_parameters():
            p.requires_grad_(name.split(".", 2)[2].startswith(FAR_OWN))  # blocks.<b>.<param>: W_O stays frozen
        self.taps = MixerTaps(self.teacher)

    def clip_groups(self):
        return [[p for p in m.parameters() if p.requires_grad] for m in self.model.blocks]

    def evaluated(self) -> nn.Module:
        return self.student.to(next(self.model.parameters()).device)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        with torch.no_grad():
            self.teacher(x)
            inputs, targets = self.taps.take()
        inputs, targets = [inputs[i] for i in self.far_idx], [targets[i] for i in self.far_idx]
        outs = model(inputs)
        out: Dict[str, torch.Tensor] = {}
        out["loss"] = _add_block_terms(out, outs, targets, self.kind, self.far_idx)
        return out

    def remove_hooks(self) -> None:
        self.taps.remove()


class DistillTask(Task):
    """Distillation with the student's own forward pass. stage 1 (joint): only the FAR modules' own
    parameters train; stage 2: every parameter. loss = ce_weight * CE + block_weight * sum of block losses
    (`kind`) + kd_weight * kd_loss at kd_temperature. clean_blocks (only with cfg.weight_noise > 0): the block
    losses move to clean_loss, which the loop takes at the clean weights after the noisy step's backward."""

    name = "distill"

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: TrainConfig, stage: int,
                 ce_weight: float = 1.0, block_weight: float = 1.0, kd_weight: float = 0.0,
                 kd_temperature: float = 1.0, kind: str = "cos", clean_blocks: bool = False):
        super().__init__(student, cfg)
        _check_weights(ce_weight=ce_weight, block_weight=block_weight, kd_weight=kd_weight)
        if not kd_temperature > 0:
            raise ConfigError(f"kd temperature must be > 0, got {kd_temperature}")
        block_loss(torch.ones(1, 1, 1), torch.ones(1, 1, 1), kind)  # validates the kind
        if len(token_mixers(student)) != len(token_mixers(teacher)):
            raise ConfigError("teacher and student have different numbers of blocks")
        self.name = f"distill-stage{stage}"
        self.stage, self.kind = stage, kind
        self.ce_weight, self.block_weight = ce_weight, block_weight
        self.kd_weight, self.kd_temperature = kd_weight, kd_temperature
        # under weight noise: the block losses at the clean weights (clean_loss), CE and KD at the noisy ones
        self.clean_blocks = clean_blocks and cfg.weight_noise > 0 and block_weight > 0
        self.teacher = _freeze(teacher)
        self.far_idx = far_block_indices(student)
        partial = len(self.far_idx) < len(token_mixers(student))
        for p in student.parameters():
            p.requires_grad_(stage == 2 and not partial)
        if stage == 2 and partial:  # a partial student: stage 2 trains the replaced blocks only
            for i in self.far_idx:
                student.blocks[i].requires_grad_(True)
        self.features = getattr(teacher, "num_classes", None) == 0  # no classifier: KD on the pooled features
        if stage == 1:
            for m in token_mixers(student):
                for name, p in m.named_parameters():
                    if name.startswith(FAR_OWN):
                        p.requires_grad_(True)
        self.s_taps = MixerTaps(student, inputs=False)
        self.t_taps = MixerTaps(teacher, inputs=False)

    def _forward(self, model: nn.Module, x: torch.Tensor, with_teacher: bool) -> tuple:
        """(student logits, its FAR blocks' outputs, and with_teacher: the teacher's logits and the same blocks'
        attention outputs, else None, None)."""
        t_logits = t_feats = None
        if with_teacher:
            with torch.no_grad():
                t_logits = self.teacher(x)
            _, t_all = self.t_taps.take()
            t_feats = [t_all[i] for i in self.far_idx]
        logits = model(x)
        _, s_all = self.s_taps.take()
        return logits, [s_all[i] for i in self.far_idx], t_logits, t_feats

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        need_blocks = self.block_weight > 0 and not self.clean_blocks
        logits, s_feats, t_logits, t_feats = self._forward(model, x, need_blocks or self.kd_weight > 0)
        loss = 0.0
        if self.ce_weight > 0:
            ce = classification_loss(logits, y, self.cfg.label_smoothing)  # soft targets under mixup
            loss = loss + self.ce_weight * ce
            out["ce"] = ce.detach()
        if need_blocks:
            loss = loss + self.block_weight * _add_block_terms(out, s_feats, t_feats, self.kind, self.far_idx)
        if self.kd_weight > 0:
            kd = relative_mse(logits, t_logits) if self.features else kd_loss(logits, t_logits, self.kd_temperature)
            loss = loss + self.kd_weight * kd
            out["kd"] = kd.detach()
        out["loss"] = loss
        return out

    def clean_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Optional[Dict[str, torch.Tensor]]:
        """With clean_blocks: block_weight x the block losses of the student at its clean weights (the loop
        calls this after the noisy forward and backward, the noise removed)."""
        if not self.clean_blocks:
            return None
        _, s_feats, _, t_feats = self._forward(model, x, with_teacher=True)
        out: Dict[str, torch.Tensor] = {}
        out["loss"] = self.block_weight * _add_block_terms(out, s_feats, t_feats, self.kind, self.far_idx)
        return out

    def remove_hooks(self) -> None:
        self.s_taps.remove()
        self.t_taps.remove()


# ---------------------------------------------------------------- the student
class _Polish:
    """The polish stage (far.methods.polish.polish_blocks) in the shape distill's stages take: every FAR block of
    `student`, alone, by full-batch L-BFGS on its cached teacher problem. Trains the blocks' own parameters
    (FAR_OWN: not W_O), whatever requires_grad says."""

    name = "distill-polish"

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: TrainConfig, st: "DistillSettings"):
        self.student, self.teacher, self.cfg, self.st = student, teacher, cfg, st

    def run(self, train_data, d) -> TrainResult:
        t0 = time.perf_counter()
        if self.cfg.out_dir is not None and d.main:
            os.makedirs(self.cfg.out_dir, exist_ok=True)
        rows = polish_blocks(self.student.to(d.device), _freeze(self.teacher), train_data, iters=self.st.polish_iters,
                             images=self.st.polish_images, kind=self.st.block_loss,
                             batch_size=self.cfg.eval_batch_size, device=d.device, rank=d.rank, world=d.world,
                             broadcast=_broadcast if d.world > 1 else None, seed=self.cfg.seed,
                             progress=self.cfg.progress and d.main, owned=lambda name: name.startswith(FAR_OWN))
        return TrainResult(self.student, rows, None, time.perf_counter() - t0, sum(r.get("evals", 0) for r in rows),
                           None, True)

    def remove_hooks(self) -> None:
        pass


def _polish_rows(history: List[dict]) -> list:
    """The report's line for a polish stage: each block's full-batch loss before -> after (those this process
    polished: every block with one process)."""
    rows = [r for r in history if r.get("kind") == "polish" and "loss" in r]
    if not rows:
        return []
    return [("polish loss per block", " ".join(f"{r['loss_start']:.4f}->{r['loss']:.4f}" for r in rows))]


def _broadcast(t: torch.Tensor, src: int) -> None:
    torch.distributed.broadcast(t, src=src)


def make_student(teacher: nn.Module, hidden_sizes=None, init: str = "v", blocks=None) -> nn.Module:
    """A FAR copy of `teacher` (attention replaced in every block, or in `blocks`; W_O and the rest copied;
    pre_proj from `init` "v" or "random"; the teacher is untouched)."""
    student = copy.deepcopy(teacher)
    convert(student, hidden_sizes=hidden_sizes, pre_proj_init=init, blocks=blocks)
    student.far_metadata = {}
    return student


def check_student(student: nn.Module, teacher: nn.Module) -> None:
    """ConfigError unless `student` is a FAR model with the teacher's blocks, widths, tokens and classes."""
    if not far_modules(student):
        raise ConfigError("the student has no FAR modules; pass a FAR model (far.distill makes one)")
    if len(token_mixers(student)) != len(token_mixers(teacher)):
        raise ConfigError(f"the student has {len(token_mixers(student))} blocks, the teacher "
                          f"{len(token_mixers(teacher))}")
    for i, (s, t) in enumerate(zip(token_mixers(student), token_mixers(teacher))):
        sw, tw = (list(getattr(m.proj, "weight", torch.empty(0)).shape) for m in (s, t))
        if sw != tw:
            raise ConfigError(f"block {i}: the student's W_O has {sw} channels [out, in], the teacher's {tw}: "
                              "a student of another architecture")
    tokens = [(getattr(getattr(m, "patch_embed", None), "num_patches", None), getattr(m, "num_prefix_tokens", None))
              for m in (student, teacher)]
    if tokens[0] != tokens[1]:
        raise ConfigError("the student has {} patches + {} prefix tokens, the teacher {} + {}: a student of another "
                          "architecture".format(*tokens[0], *tokens[1]))
    s_cls, t_cls = getattr(student, "num_classes", None), getattr(teacher, "num_classes", None)
    if s_cls != t_cls:
        raise ConfigError(f"the student predicts {s_cls} classes, the teacher {t_cls}")


def adopt_classifier(student: nn.Module, teacher: nn.Module) -> bool:
    """Give `student` a copy of the teacher's classifier when their numbers of classes differ (distillation
    on a downstream set: the teacher was fine-tuned on it, the FAR student was not). True if it changed."""
    from far.methods.supervised import retarget_classes

    k = getattr(teacher, "num_classes", None)
    if not k or k < 2 or getattr(student, "num_classes", None) == k or not hasattr(teacher, "get_classifier"):
        return False  # same classes, or a backbone without classifier (check_student says what does not fit)
    retarget_classes(student, k)
    try:
        student.get_classifier().load_state_dict(teacher.get_classifier().state_dict())
    except (RuntimeError, AttributeError) as e:
        raise ConfigError(f"cannot give the student the teacher's {k}-class classifier: "
                          f"{' '.join(str(e).split())[:200]}") from None
    return True


LOW_PRECISION = (torch.bfloat16, torch.float16)


def _low_precision(model: nn.Module) -> bool:
    """True if a parameter is bf16 / fp16: trained in that dtype, AdamW steps below half an ulp of a weight are
    lost, so distillation trains in float32 (bf16 autocast on GPUs is `amp`, with float32 weights)."""
    return any(p.dtype in LOW_PRECISION for p in model.parameters())


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


# ---------------------------------------------------------------- the method
@dataclasses.dataclass
class DistillSettings:
    """The method's choices (see far.distill); recorded in the student's metadata and a resumed run's identity."""
    stage1: str = "isolated"
    block_loss: str = "cos+mse"
    joint_epochs: float = 0.0
    stage2_epochs: float = 1.0
    stage2_lr: float = 2e-4
    ce_weight: float = 1.0
    block_weight: float = 1.0
    kd_weight: float = 1.0
    kd_temperature: float = 2.0
    stage2_block_weight: float = 1.0
    labels: bool = True
    blocks: Optional[List[int]] = None  # the blocks a new student replaces (None: every one)
    pre_proj_init: str = "v"
    joint_lr: Optional[float] = None  # the joint phase's peak LR (None: STAGE1_LR["joint"])
    clean_block_loss: bool = False  # under weight noise: block losses at the clean weights (a second pass)
    polish_iters: int = 0  # L-BFGS iterations per block after stage 1 (far.methods.polish; 0 = none)
    polish_images: int = POLISH_IMAGES

    def validate(self, stage1_epochs: float) -> "DistillSettings":
        if self.stage1 not in STAGE1_MODES:
            raise ConfigError(f"stage1 must be one of {', '.join(STAGE1_MODES)}, got {self.stage1!r}")
        block_loss(torch.ones(1, 1, 1), torch.ones(1, 1, 1), self.block_loss)
        check_polish(self.polish_iters, self.polish_images)
        for name in ("joint_epochs", "stage2_epochs", "stage2_lr", "ce_weight", "block_weight", "kd_weight",
                     "stage2_block_weight"):
            finite_number(name.replace("_", " "), getattr(self, name), low=0)
        finite_number("kd temperature", self.kd_temperature, low=0, strict=True)
        if self.joint_lr is not None:
            finite_number("joint lr", self.joint_lr, low=0, strict=True)
        if stage1_epochs == 0 and self.joint_epochs == 0 and self.stage2_epochs == 0 and self.polish_iters == 0:
            raise ConfigError("every stage has 0 epochs (and no polish): nothing to train")
        ce = self.ce_weight if self.labels else 0.0
        joint = self.joint_epochs > 0 or (self.stage1 == "joint" and stage1_epochs > 0)
        if joint and ce + self.kd_weight + self.block_weight == 0:  # before stage 1, not when the joint phase starts
            raise ConfigError("the joint stage has no loss: give it a block weight or a kd weight"
                              + ("" if self.labels else " (without labels there is no cross-entropy)"))
        if self.stage2_epochs > 0 and ce + self.kd_weight + self.stage2_block_weight == 0:
            raise ConfigError("stage 2 has no loss: give it a kd weight or a stage-2 block weight"
                              + ("" if self.labels else " (without labels there is no cross-entropy)"))
        return self


def distill(teacher: nn.Module, train_data, *, student: Optional[nn.Module] = None, eval_data=None,
            config: Optional[TrainConfig] = None, stage1: str = "isolated", block_loss: str = "cos+mse",
            joint_epochs: float = 0.0, stage2_epochs: float = 1.0, stage2_lr: float = 2e-4, ce_weight: float = 1.0,
            block_weight: float = 1.0, kd_weight: float = 1.0, kd_temperature: float = 2.0,
            stage2_block_weight: float = 1.0, labels: bool = True, hidden_sizes=None, device: Optional[str] = None,
            blocks=None, pre_proj_init: str = "v", joint_lr: Optional[float] = None,
            clean_block_loss: bool = False, polish_iters: int = 0, polish_images: int = POLISH_IMAGES,
            identity: Optional[dict] = None, recipe: str = "far", explicit=None) -> nn.Module:
    """Distil `teacher` (an attention ViT) into a FAR student and return the student. Neither the
    teacher nor a given student is changed: the student trained is a copy, and the teacher's device,
    train/eval mode and requires_grad flags are restored afterwards.

    Args:
        teacher: the attention model.
        train_data / eval_data: datasets of (image, label) (labels unused when labels=False); eval_data
            (optional) is tested after each epoch.
        student: a FAR model to continue from (default: far.convert of a copy of the teacher, LSTMs
            initialized from config.seed, pre_proj from the value projection). When its number of classes
            differs from the teacher's (a downstream teacher), it gets a copy of the teacher's classifier.
        config: the training options of stage 1 (its epochs and lr; 0 epochs skips it); the joint phase
            and stage 2 reuse them with their own epochs and LRs (joint_lr, stage2_lr). None: TrainConfig's
            defaults with stage 1's LR of STAGE1_LR (1e-2 isolated, 1e-3 joint). config.out_dir None writes
            nothing; with a folder, <out_dir>/stage1, /joint and /stage2 hold each stage's resumable state
            and metrics, and config.resume continues an interrupted run.
        stage1: "isolated" (each block on the teacher's own inputs) or "joint" (all blocks in the student).
        block_loss: "cos", "mse" or "cos+mse" (module docstring).
        joint_epochs: epochs of the in-model block-loss phase after stage 1 (0 = none); joint_lr: its peak
            LR (None: 1e-3, STAGE1_LR["joint"]).
        ce_weight, block_weight: weights of CE and the block losses in the joint stages (CE is unused in
            an isolated stage 1); kd_weight, kd_temperature: logit distillation in the joint phases and
            stage 2 (0 = off); stage2_block_weight: the block losses kept in stage 2 as a regularizer.
            The defaults (isolated stage 1 with cos+mse; stage 2 with CE, logit distillation at T = 2 and
            the block losses at weight 1) are the best of bench/ablate_distill.py's comparison (README).
        labels: False trains without labels (no CE anywhere). A teacher without a classifier
            (num_classes 0, e.g. a DINOv2 backbone) always trains so: its logit distillation compares the
            pooled features instead (relative squared error, kd_temperature unused) and eval_data is
            ignored (there is no top-1 to measure).
        blocks: the blocks a new student replaces (block indices, or a string like "0-5"; default every
            one). The others keep the teacher's attention, frozen: stage 1 trains the replaced blocks' FAR
            modules, stage 2 every parameter of the replaced blocks (of the whole model when all are).
        pre_proj_init: a new student's pre_proj: "v" (the attention's value projection) or "random".
        clean_block_loss: with config.weight_noise (noise-aware training), take the block losses at the
            clean weights, in a second forward and backward each step, and only CE and logit distillation
            at the noisy ones: the blocks stay faithful to the teacher while the classifier learns to
            tolerate the noise (README "Noise-aware training"). A stage of block losses alone (an isolated
            stage 1) then trains without noise. Costs about 1.7x the time of a noisy step.
        polish_iters: after stage 1 (or with 0 stage-1 epochs, on the student as given), polish every FAR block
            with at most this many full-batch L-BFGS iterations on its block loss, over the teacher's block inputs
            and outputs for the first polish_images training images, cached one block at a time
            (far.methods.polish; each evaluation costs about one epoch of polish_images images for that block).
            The polish is noise-free (config.weight_noise is not applied there). 0 = none (the default).
        hidden_sizes: LSTM units of a new student: an int, or one entry per replaced block (an int or a [2, H]).
        device: cpu, cuda, cuda:N (default: the process's GPU under torchrun, else cuda if present, else cpu).
        identity: extra settings a resumed run must match (e.g. the teacher's file and the data's name).
        recipe: "far" (the defaults above) or "paper" (the FAR authors' public recipe, far.methods.recipes:
            DeiT augmentation, drop-path, EMA, LR x global batch / 512, joint stage 1 for 200 epochs, CE-only
            stage 2 for 100). The preset fills every option not in `explicit`.
        explicit: names of the options (keyword arguments above, TrainConfig fields) you set on purpose;
            None = those whose values differ from their defaults.
    Returns:
        the student (eval mode), with `far_metadata` (the record far.save stores) and `far_run` (a
        far.train.RunReport: history, accuracy, seconds, completed; completed False when
        config.max_steps stopped it, to be resumed).
    """
    if config is None and recipe == "far":  # (another recipe sets the LR itself)
        config = TrainConfig(lr=STAGE1_LR.get(stage1, TrainConfig.lr))
    cfg = config or TrainConfig()
    if recipe != "far":
        from far.methods.recipes import apply as apply_recipe

        given = dict(stage1=stage1, block_loss=block_loss, joint_epochs=joint_epochs, stage2_epochs=stage2_epochs,
                     stage2_lr=stage2_lr, ce_weight=ce_weight, block_weight=block_weight, kd_weight=kd_weight,
                     stage2_block_weight=stage2_block_weight)
        defaults = {k: v.default for k, v in inspect.signature(distill).parameters.items() if k in given}
        cfg, given, recipe_record = apply_recipe(recipe, cfg, given, explicit, defaults)
        (stage1, block_loss, joint_epochs, stage2_epochs, stage2_lr, ce_weight, block_weight, kd_weight,
         stage2_block_weight) = (given[k] for k in ("stage1", "block_loss", "joint_epochs", "stage2_epochs",
                                                    "stage2_lr", "ce_weight", "block_weight", "kd_weight",
                                                    "stage2_block_weight"))
    else:
        from far.methods.recipes import preset

        preset(recipe)
        recipe_record = {"name": "far"}
    if cfg.epochs < 0:  # before validate, whose "epochs must be > 0" would hide that 0 skips stage 1
        raise ConfigError(f"stage 1 epochs must be >= 0 (0 skips stage 1), got {cfg.epochs}")
    dataclasses.replace(cfg, epochs=cfg.epochs or 1.0).validate()
    check_fresh_run(cfg)  # every stage's folder, before stage 1 could overwrite its own
    check_resumable(cfg)  # a --resume with nothing to resume would start every stage over
    train_data, eval_data = limit_data(cfg, train_data, eval_data)
    headless = getattr(teacher, "num_classes", None) == 0  # a backbone: no CE, KD on its pooled features
    if headless:
        eval_data = None
    if isinstance(blocks, str):
        blocks = parse_blocks(blocks)
    if pre_proj_init not in PRE_PROJ_INITS:
        raise ConfigError(f"pre_proj_init must be one of {', '.join(PRE_PROJ_INITS)}, got {pre_proj_init!r}")
    if student is not None and blocks is not None:
        raise ConfigError("blocks chooses what a new student replaces; an existing student keeps its own")
    _check_images(teacher, train_data, "train_data")
    settings = DistillSettings(stage1, block_loss, joint_epochs, stage2_epochs, stage2_lr, ce_weight, block_weight,
                               kd_weight, kd_temperature, stage2_block_weight, labels and not headless,
                               None if blocks is None else [int(b) for b in blocks], pre_proj_init, joint_lr,
                               bool(clean_block_loss), polish_iters, polish_images).validate(cfg.epochs)
    if settings.clean_block_loss and not cfg.weight_noise > 0:
        raise ConfigError("clean block loss needs weight noise (--weight-noise ETA): without it every weight is clean")
    if student is not None and hidden_sizes is not None:
        raise ConfigError("hidden_sizes sizes a new student; an existing student keeps its own sizes")
    if far_modules(teacher):
        raise ConfigError("the teacher is already a FAR model; distil from an attention model")
    saved = _teacher_state(teacher)
    if _low_precision(teacher):  # a float32 copy (the same values): the student is made from it and trains in float32
        teacher = copy.deepcopy(teacher).float()
    try:
        return _distill(teacher, train_data, student, eval_data, cfg, settings, hidden_sizes, device, identity,
                        recipe_record)
    finally:
        _restore_teacher(teacher, saved)


def _noise_for(c: TrainConfig, st: DistillSettings, ce: float, blocks_only: bool = False):
    """(the stage's config, whether its block losses go in the clean pass). Under clean_block_loss a stage
    with block losses only (an isolated stage 1; any stage with neither CE nor KD) has no term at the noisy
    weights: it runs without weight noise and takes its block losses in its one, clean, pass."""
    if st.clean_block_loss and (blocks_only or (ce == 0 and st.kd_weight == 0)):
        return dataclasses.replace(c, weight_noise=0.0), False
    return c, st.clean_block_loss


def _distill(teacher, train_data, student, eval_data, cfg: TrainConfig, st: DistillSettings, hidden_sizes, device,
             identity, recipe_record: dict) -> nn.Module:
    d = setup_distributed(device)
    teacher = teacher.to(d.device).eval()
    torch.manual_seed(cfg.seed)  # the LSTMs' initialization is part of the run
    if student is None:
        student = make_student(teacher.cpu(), hidden_sizes=hidden_sizes, init=st.pre_proj_init, blocks=st.blocks)
        teacher.to(d.device)
        continued = False
    else:
        prior = getattr(student, "far_metadata", None) or getattr(student, "far_checkpoint", {}).get("metadata", {})
        s_classes = getattr(student, "num_classes", None)
        student = copy.deepcopy(student)
        if _low_precision(student):
            student.float()
        if far_modules(student) and adopt_classifier(student, teacher):  # a downstream teacher: its classes
            recipe_record = {**recipe_record, "classifier": f"copied from the teacher ({student.num_classes} classes; "
                                                             f"the student had {s_classes})"}
        check_student(student, teacher)
        continued = True
    # what the student went through before (a pruned student keeps its pruning record: `far info` shows it)
    carried = {k: prior[k] for k in ("pruning",) if continued and isinstance(prior, dict) and k in prior}
    ce = st.ce_weight if st.labels else 0.0
    ident = {**(identity or {}), "ce_weight": ce, "block_loss": st.block_loss, "stage1": st.stage1}
    if st.kd_weight > 0:
        ident.update(kd_weight=st.kd_weight, kd_temperature=st.kd_temperature)
    if st.clean_block_loss:
        ident.update(clean_block_loss=True)
    if not continued:  # what built the student: a resume must not finish a stage's model made otherwise
        ident["new_student"] = {"hidden_sizes": [m.hidden_sizes.tolist() for _, m in far_modules(student)],
                                "blocks": far_block_indices(student), "pre_proj_init": st.pre_proj_init}
    results: List[TrainResult] = []
    earlier: List[TrainResult] = []  # stages an earlier run finished, loaded from their files (they come first)
    made: Dict[str, object] = {}  # the settings of every stage so far: a finished stage's file records them

    def stage(name: str, task, c: TrainConfig, desc: str, keep: bool, block_weight: Optional[float],
              extra: Optional[dict] = None) -> bool:
        """Run one stage (or load its finished model on resume, if the settings it was made with are this
        run's); True if it completed. block_weight: the weight of the stage's block losses (None: the stage
        has nothing else, an isolated stage 1). `task`: a Task for train(), or a _Polish (which runs itself)."""
        nonlocal student
        sident = {**ident, "stage": name, **({} if block_weight is None else {"block_weight": block_weight}),
                  **(extra or {})}
        sident["before"] = dict(made)  # the stages it starts from: its state is void if they changed (or were skipped)
        made.update({f"{name}.{k}": v for k, v in stage_identity(
            task.name, c, {**sident, "world": d.world, "train_images": len(train_data)}).items()})
        done_file = None if c.out_dir is None else os.path.join(c.out_dir, "model.safetensors")
        if cfg.resume and done_file is not None and os.path.isfile(done_file):
            task.remove_hooks()
            student = load_finished_stage(done_file, made, d.device)  # finished in an earlier run
            seconds, steps, histories = finished_stage_record(student)  # its training counts in the report
            earlier.append(TrainResult(student, histories[0] if histories else [], None, seconds, steps, None, True))
            return True
        try:
            r = task.run(train_data, d) if isinstance(task, _Polish) else train(task, train_data, eval_data, c, d,
                                                                                   identity=sident, desc=desc)
        finally:
            task.remove_hooks()
        results.append(r)
        if r.completed and keep and done_file is not None and d.main:
            save(student, done_file, metadata={"stage": name, "run_identity": dict(made),
                                               "result": stage_record(r.seconds, r.steps, [r.history])})
        d.barrier()
        return r.completed

    ok = True
    if cfg.epochs > 0:
        c1 = stage_config(cfg, "stage1", min_lr=min(cfg.min_lr, cfg.lr))
        c1, clean = _noise_for(c1, st, ce, blocks_only=st.stage1 == "isolated")
        task = (IsolatedTask(student, teacher, c1, st.block_loss) if st.stage1 == "isolated" else
                DistillTask(student, teacher, c1, stage=1, ce_weight=ce, block_weight=st.block_weight,
                            kd_weight=st.kd_weight, kd_temperature=st.kd_temperature, kind=st.block_loss,
                            clean_blocks=clean))
        ok = stage("stage1", task, c1, f"distill stage 1 ({st.stage1})", keep=True,
                   block_weight=None if st.stage1 == "isolated" else st.block_weight)
    if ok and st.polish_iters > 0:
        cp = stage_config(cfg, "polish")
        ok = stage("polish", _Polish(student, teacher, cp, st), cp, "distill polish (L-BFGS)", keep=True,
                   block_weight=None, extra={"polish_iters": st.polish_iters, "polish_images": st.polish_images})
    if ok and st.joint_epochs > 0:
        joint_lr = st.joint_lr if st.joint_lr is not None else STAGE1_LR["joint"]
        cj = stage_config(cfg, "joint", epochs=st.joint_epochs, lr=joint_lr, min_lr=min(cfg.min_lr, joint_lr),
                          warmup_epochs=min(cfg.warmup_epochs, st.joint_epochs / 4))
        cj, clean = _noise_for(cj, st, ce)
        task = DistillTask(student, teacher, cj, stage=1, ce_weight=ce, block_weight=st.block_weight,
                           kd_weight=st.kd_weight, kd_temperature=st.kd_temperature, kind=st.block_loss,
                           clean_blocks=clean)
        ok = stage("joint", task, cj, "distill joint", keep=True, block_weight=st.block_weight)
    if ok and st.stage2_epochs > 0:
        c2 = stage_config(cfg, "stage2", epochs=st.stage2_epochs, lr=st.stage2_lr,
                          min_lr=min(cfg.min_lr, st.stage2_lr), warmup_epochs=min(cfg.warmup_epochs, st.stage2_epochs / 4))
        c2, clean = _noise_for(c2, st, ce)
        task = DistillTask(student, teacher, c2, stage=2, ce_weight=ce, block_weight=st.stage2_block_weight,
                           kd_weight=st.kd_weight, kd_temperature=st.kd_temperature, kind=st.block_loss,
                           clean_blocks=clean)
        ok = stage("stage2", task, c2, "distill stage 2", keep=False, block_weight=st.stage2_block_weight)
    for p in student.parameters():
        p.requires_grad_(True)
    last_acc = results[-1].final_accuracy if results else None
    if last_acc is None and eval_data is not None:  # every stage done before (resumed) or polish last: measure it
        last_acc = accuracy(student, eval_data, batch_size=cfg.eval_batch_size, device=d.device)
    fidelity = None
    if ok and eval_data is not None:  # what the method claims: every block reproduces its attention block
        report = block_fidelity(teacher, student, eval_data, batch_size=cfg.eval_batch_size, device=d.device)
        fidelity = {"num_images": report["num_images"], "agreement": report["agreement"],
                    "blocks": [{k: blk[k] for k in ("isolated", "in_model")} for blk in report["blocks"]]}
    t_acc = accuracy(teacher, eval_data, batch_size=cfg.eval_batch_size, device=d.device)
    seconds = sum(r.seconds for r in earlier + results)
    done = TrainResult(student, join_histories(*[r.history for r in earlier + results]), last_acc, seconds,
                       sum(r.steps for r in earlier + results), None, ok)
    from far.methods.recipes import lr_record

    recipe_record = {**recipe_record, "lr": lr_record(cfg, st.stage2_lr, d.world)}
    student.far_metadata = run_metadata(
        "distill", cfg, d, done, teacher_test_accuracy=t_acc, **(identity or {}), recipe=recipe_record,
        distill={"stage1_epochs": cfg.epochs, "stage1_lr": cfg.lr, **dataclasses.asdict(st), "continued": continued},
        **carried, **({"fidelity": fidelity} if fidelity is not None else {}))
    lstm = sum(m.num_lstm_params() for _, m in far_modules(student))
    student.far_run = RunReport(
        "distill", done.history, done.final_accuracy, seconds, done.steps, done.completed, cfg.out_dir,
        rows=[("teacher top-1", f"{100 * t_acc:.2f}%" if t_acc is not None else "n/a"),
              ("FAR parameters", f"{sum(t.numel() for t in stored_tensors(student).values()):,}"),
              ("LSTM + head_proj params", f"{lstm:,}"), ("processes", str(d.world))]
        + ([("block cosine isolated / in model", " ".join(
            (f"{b['isolated']['cos']:.3f}" if b.get("isolated") else "-") + f"/{b['in_model']['cos']:.3f}"
            for b in fidelity["blocks"])),  # "-": a block that kept its attention (partial student)
            ("top-1 agreement with the teacher", f"{100 * fidelity['agreement']:.2f}%")] if fidelity else [])
        + _polish_rows(done.history))
    return student.eval()
