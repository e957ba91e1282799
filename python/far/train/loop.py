"""The training loop every far method runs on: one process, or many under torchrun.

What it gives a method (distill, prune, supervised training):
- DistributedDataParallel when launched by `torchrun` (NCCL on GPUs, gloo on CPUs) with a
  DistributedSampler; one process otherwise. batch_size is per process.
- AdamW, linear warm-up then cosine decay (per step), label smoothing, gradient clipping, optional
  EMA of the weights, bf16 autocast on GPUs.
- DeiT-style regularization when asked (all off by default; `far distill --recipe paper` sets them):
  mixup/cutmix (timm Mixup: soft targets, SoftTargetCrossEntropy), RandAugment and random erasing
  (per image, on PIL images: far.data.deit_view), repeated augmentation under DDP (timm
  RepeatAugSampler), drop-path on timm blocks for the run, and the LR scaled by global batch / N.
- Determinism that survives a kill: the data order is DistributedSampler(seed, epoch), and every
  step reseeds torch's RNG (dropout, drop-path, augmentation) from (seed, step, rank), and every
  image of a DataLoader is read with its RNGs seeded by (seed, step, rank, position), so a run
  resumed from a checkpoint takes exactly the steps the uninterrupted run would have taken.
- With an out_dir: atomic checkpoints every `ckpt_every` steps and at each epoch end
  (`<out>/last.pt`: tensors, ints and strings only, loaded with weights_only=True; `resume=True`
  continues from it) and JSON-lines metrics (`<out>/metrics.jsonl`). Without one (out_dir=None)
  nothing is written. A progress bar when cfg.progress; no other output.

A method supplies a `Task`: the model to train, which parameters train, and `loss(model, x, y)`
returning a dict of scalar tensors with a "loss" key (timm's distillation task style).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from far.errors import CheckpointError, ConfigError
from far.evaluate import accuracy
from far.models.factory import check_input, check_labels
from far.utils.env import device_name
from far.utils.fs import append_jsonl, atomic_write, check_folder, make_folder, strict_json
from far.utils.plot import pyplot, save_figure

CKPT_NAME = "last.pt"
METRICS_NAME = "metrics.jsonl"
STATE_VERSION = 1


@dataclass
class TrainConfig:
    """Options of a training run (the CLI flags of the same names).

    epochs may be fractional (e.g. 0.5 = half an epoch); warmup_epochs likewise. max_steps stops
    the run early after that many optimizer steps (its state is saved: useful to split a run).
    out_dir None writes nothing (no resumable state, no metrics file). A new run (resume False) refuses
    an out_dir that holds an unfinished run's state unless force (then it starts over there)."""
    epochs: float = 10.0
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    ema: float = 0.0
    seed: int = 0
    augment: bool = True
    ckpt_every: int = 200
    log_every: int = 20
    eval_batch_size: int = 500
    eval_limit: Optional[int] = None
    limit: Optional[int] = None
    max_steps: Optional[int] = None
    amp: str = "auto"
    workers: int = 0
    progress: bool = True
    out_dir: Optional[str] = None
    resume: bool = False
    force: bool = False  # start over in an out_dir that holds an unfinished run (see check_fresh_run)
    # DeiT-style recipe options (0/None/False = off): see the module docstring and far.methods.recipes
    mixup: float = 0.0
    cutmix: float = 0.0
    rand_augment: Optional[str] = None
    reprob: float = 0.0
    repeated_aug: bool = False
    drop_path: float = 0.0
    lr_scale_batch: int = 0
    # noise-aware training (0 = off): Gaussian noise on the matching weights during each step's forward and
    # backward, std weight_noise x each output row's largest |w| (see weight_noise and docs/design.md)
    weight_noise: float = 0.0
    weight_noise_on: str = "w_ih"

    def validate(self) -> "TrainConfig":
        numbers = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), float)}
        bad = [f"{k}={v}" for k, v in numbers.items() if not math.isfinite(v)]
        if bad:  # nan passes every comparison below as False, inf most as True
            raise ConfigError(f"training settings must be finite numbers, got {', '.join(bad)}")
        checks = [
            (self.epochs > 0, f"epochs must be > 0, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.min_lr <= self.lr, f"min-lr must be in [0, lr={self.lr}], got {self.min_lr}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_epochs >= 0, f"warmup epochs must be >= 0, got {self.warmup_epochs}"),
            (0 <= self.label_smoothing < 1, f"label smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.grad_clip >= 0, f"grad clip must be >= 0 (0 = off), got {self.grad_clip}"),
            (0 <= self.ema < 1, f"ema decay must be in [0, 1) (0 = off), got {self.ema}"),
            (self.ckpt_every >= 1, f"ckpt-every must be >= 1 step, got {self.ckpt_every}"),
            (self.log_every >= 1, f"log-every must be >= 1 step, got {self.log_every}"),
            (self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}"),
            (self.eval_limit is None or self.eval_limit >= 1, f"eval limit must be >= 1, got {self.eval_limit}"),
            (self.max_steps is None or self.max_steps >= 1, f"max steps must be >= 1, got {self.max_steps}"),
            (self.amp in ("auto", "bf16", "fp16", "off"), f"amp must be auto/bf16/fp16/off, got {self.amp!r}"),
            (self.workers >= 0, f"workers must be >= 0, got {self.workers}"),
            (not self.resume or self.out_dir is not None, "resume needs an out_dir (the run folder to resume)"),
            (self.mixup >= 0 and self.cutmix >= 0, f"mixup/cutmix alphas must be >= 0, got {self.mixup}/{self.cutmix}"),
            (self.mixup + self.cutmix == 0 or self.batch_size % 2 == 0,
             f"mixup/cutmix pair images within a batch: the batch size must be even, got {self.batch_size}"),
            (0 <= self.reprob <= 1, f"random-erasing probability must be in [0, 1], got {self.reprob}"),
            (0 <= self.drop_path < 1, f"drop-path must be in [0, 1), got {self.drop_path}"),
            (self.lr_scale_batch >= 0, f"lr-scale-batch must be >= 0 (0 = off), got {self.lr_scale_batch}"),
            (self.weight_noise >= 0, f"weight noise must be >= 0 (0 = off), got {self.weight_noise}"),
            (self.weight_noise == 0 or bool(noise_patterns(self.weight_noise_on)),
             f"weight-noise-on must name at least one parameter pattern, got {self.weight_noise_on!r}"),
            (self.rand_augment is None or self.rand_augment.startswith("rand-"),
             f"rand_augment must be a timm RandAugment string like rand-m9-mstd0.5-inc1, got {self.rand_augment!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        if self.out_dir is not None:  # the run folder holds last.pt and metrics.jsonl: writable, before any work
            check_folder(self.out_dir, "out_dir")
        return self


# ---------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def setup_distributed(device: Optional[str] = None) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPUs, gloo on CPUs; once: later
    calls reuse it) and pick the device: `device` if given, else cuda:<LOCAL_RANK> when a GPU is
    present, else cpu."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None or device == "auto":
        dev = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"device {device!r}: {e}") from None
        if dev.type not in ("cpu", "cuda"):  # before any model moves there (meta would drop its weights)
            raise ConfigError(f"device must be cpu or cuda[:N] (or None/'auto'), got {device!r}")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {dev} requested but no CUDA GPU is available")
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local, device=dev)


def cleanup_distributed() -> None:
    """Leave the torchrun process group (the CLI does this when a command ends)."""
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- data
def _step_seed(seed: int, step: int, rank: int) -> int:
    """A per-(run seed, step, rank) seed: reseeding every step makes resumed runs take identical steps."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729 + 12_345) % (2 ** 63 - 1)


class _SeededItems(torch.utils.data.Dataset):
    """`dataset` keyed (index, seed): item `index` is read with python's, numpy's and torch's RNGs seeded from
    `seed` (and restored after), so random transforms a dataset applies itself (an image folder's random resized
    crop and flip) are the same in a resumed run, a repeated run and with any number of DataLoader workers."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        from far.utils.env import seeded_rngs

        i, seed = key
        with seeded_rngs(seed):
            return self.dataset[int(i)]


class TrainData:
    """Training batches for one process: indices from DistributedSampler(seed, epoch), shard `rank`
    of `world` (timm's RepeatAugSampler instead with repeated_aug under DDP); in-memory fast path
    (uint8 gather + batched augmentation) for Fashion-MNIST, a DataLoader over the shard for image
    folders, each image read with the RNGs seeded by (seed, step, rank, position), so that its random
    crop and flip are resumable. With rand_augment or reprob every image goes through DeiT's per-image
    transforms (far.data.deit_view), seeded the same way.
    drop_last: every step has a full batch."""

    def __init__(self, dataset, batch_size: int, d: Dist, seed: int, augment: bool, workers: int = 0,
                 rand_augment: Optional[str] = None, reprob: float = 0.0, repeated_aug: bool = False):
        from far.data import RandomShiftFlip, deit_view  # the Fashion-MNIST fast path's augmentation; DeiT's

        self.dataset = dataset
        self.batch_size = batch_size
        self.d = d
        self.seed = seed
        self.workers = workers
        self.view = None
        if rand_augment or reprob > 0:
            self.view, why = deit_view(dataset, rand_augment=rand_augment, reprob=reprob)
            if self.view is None:
                warnings.warn(f"RandAugment / random erasing not applied: {why}", stacklevel=3)
        self.fast = self.view is None and hasattr(dataset, "images") and hasattr(dataset, "normalize")
        self.augment = RandomShiftFlip(pad=2, flip=0.5) if (augment and self.fast) else None
        self.repeated = repeated_aug and d.world > 1  # as DeiT: repeated augmentation only when distributed
        n = len(dataset)
        per_rank = len(self._sampler()) if self.repeated else math.ceil(n / d.world)
        self.steps_per_epoch = per_rank // batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(f"the training set has {n} images: fewer than one batch of {batch_size} per process "
                             f"({d.world} process(es)); lower --batch-size or use more data")

    def _sampler(self):
        if self.repeated:  # each image 3 times per epoch, its copies on different processes (DeiT)
            from timm.data.distributed_sampler import RepeatAugSampler

            n = len(self.dataset)  # DeiT rounds the epoch down to a multiple of 256 images; tiny sets keep all
            return RepeatAugSampler(range(n), num_replicas=self.d.world, rank=self.d.rank, shuffle=True,
                                    selected_round=256 if n >= 256 * self.d.world else 0)
        from torch.utils.data.distributed import DistributedSampler

        return DistributedSampler(range(len(self.dataset)), num_replicas=self.d.world, rank=self.d.rank,
                                  shuffle=True, seed=self.seed, drop_last=False)

    def _indices(self, epoch: int) -> List[int]:
        sampler = self._sampler()
        # RepeatAugSampler seeds its shuffle with the epoch alone: fold the run's seed in
        sampler.set_epoch(self.seed * 1_000_003 + epoch if self.repeated else epoch)
        return [int(i) for i in iter(sampler)]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Batches [start_step, steps_per_epoch) of `epoch` on the process's device."""
        idx = self._indices(epoch)[start_step * self.batch_size:self.steps_per_epoch * self.batch_size]
        dev = self.d.device
        if self.fast:
            images, targets = self.dataset.on_device(dev)
            order = torch.tensor(idx, dtype=torch.int64, device=dev)
            for i, s in enumerate(range(0, len(idx), self.batch_size)):
                b = order[s:s + self.batch_size]
                x = self.dataset.normalize(images[b])
                if self.augment is not None:  # its own generator, seeded by the global step
                    step = epoch * self.steps_per_epoch + start_step + i
                    self.augment.generator = torch.Generator().manual_seed(_step_seed(self.seed, step, self.d.rank) + 1)
                    x = self.augment(x)
                yield x, targets[b]
            return
        # (index, seed) keys: every image's random transforms (DeiT's view; an image folder's own random resized
        # crop and flip, which draw from python's and torch's global RNGs) seeded by its place in the run
        keys = []
        for i, s in enumerate(range(0, len(idx), self.batch_size)):
            base = _step_seed(self.seed, epoch * self.steps_per_epoch + start_step + i, self.d.rank) + 2
            keys += [(j, (base * 31 + k) % (2 ** 63 - 1)) for k, j in enumerate(idx[s:s + self.batch_size])]
        items = self.view if self.view is not None else _SeededItems(self.dataset)
        loader = torch.utils.data.DataLoader(items, batch_size=self.batch_size, sampler=keys, drop_last=True,
                                             num_workers=self.workers, pin_memory=dev.type == "cuda")
        for x, y in loader:
            yield x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)


# ---------------------------------------------------------------- schedule, EMA
def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up from lr/warmup to lr over `warmup` steps, then cosine decay to min_lr at `total`."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


class EMA:
    """Exponential moving average of a model's floating-point state (parameters and buffers)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Temporarily load the EMA weights into `model`."""
        saved = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield model
        finally:
            model.load_state_dict(saved, strict=False)


# ---------------------------------------------------------------- recipe pieces
def effective_lr(lr: float, cfg: TrainConfig, world: int) -> float:
    """`lr` as the loop uses it: times global batch / cfg.lr_scale_batch when that is set (DeiT's linear
    scaling rule, lr x batch x processes / 512), else unchanged."""
    if not cfg.lr_scale_batch:
        return lr
    return lr * cfg.batch_size * world / cfg.lr_scale_batch


def classification_loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against hard labels y [B] (with label smoothing) or soft targets y [B, K] (mixup/cutmix:
    timm's SoftTargetCrossEntropy; the smoothing is already in the targets)."""
    if y.dim() == 2:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()(logits.float(), y.float())
    return F.cross_entropy(logits, y, label_smoothing=label_smoothing)


def make_mixup(cfg: TrainConfig, num_classes: Optional[int]):
    """timm's Mixup for cfg.mixup / cfg.cutmix (DeiT's settings: prob 1, switch prob 0.5, per batch; the label
    smoothing goes into the soft targets), or None when both are 0."""
    if cfg.mixup + cfg.cutmix == 0:
        return None
    if not num_classes:
        raise ConfigError("mixup/cutmix need the model's number of classes (it has no num_classes)")
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                 label_smoothing=cfg.label_smoothing, num_classes=num_classes)


def apply_mixup(mix, x: torch.Tensor, y: torch.Tensor, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mixed images, soft targets [B, K]); labels < 0 (no labels) stay as they are. timm draws lambda
    from numpy's global RNG: seeded here (and restored) so a resumed run mixes alike."""
    import numpy as np

    state = np.random.get_state()
    np.random.seed(seed % (2 ** 32))
    try:
        unlabeled = bool((y < 0).any())
        x, soft = mix(x, y.clamp_min(0) if unlabeled else y)
    finally:
        np.random.set_state(state)
    return x, (y if unlabeled else soft)


def _forward_backward(loss_fn, model, x, y, d, amp, scaler, desc: str, step: int, lr: float):
    """loss_fn(model, x, y) under autocast, checked finite, and its backward (scaled with a GradScaler):
    gradients accumulate into .grad. Returns the loss dict (None if loss_fn returned None)."""
    with torch.autocast(d.device.type, dtype=amp, enabled=amp is not None):
        losses = loss_fn(model, x, y)
    if losses is None:
        return None
    loss = losses["loss"]
    if not torch.isfinite(loss):
        raise ConfigError(f"{desc}: the loss became {float(loss)} at step {step} (lr {lr:.3g}); "
                          "lower --lr or check the data")
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return losses


# ---------------------------------------------------------------- noise-aware training
def noise_patterns(text: str) -> List[str]:
    """The glob patterns of --weight-noise-on (comma-separated)."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def noisy_weights(model: nn.Module, trainable: List[Tuple[str, nn.Parameter]], patterns: List[str]
                  ) -> List[Tuple[str, nn.Parameter, Tuple[int, ...]]]:
    """The trained weights that --weight-noise perturbs: (name, parameter, the dimensions of its inputs).

    A pattern matches a parameter's full name or, bare (no dot), its name in any module: "w_ih" is every
    FAR block's input weights, "blocks.*.mlp.*.weight" the MLPs'. Only trained weights with at least two
    dimensions qualify: vectors a pattern matches (biases, norms: no crossbar row) are skipped, and patterns
    that match no matrix are a ConfigError. A convolution's inputs are its (in, kh, kw), every other
    weight's its last dimension (nn.Linear, and FAR's (heads, directions, 4n, inputs) storage)."""
    from fnmatch import fnmatchcase

    trained = {id(p) for _, p in trainable}
    out, seen = [], set()
    for mname, module in model.named_modules():
        conv = isinstance(module, nn.modules.conv._ConvNd)
        for pname, p in module.named_parameters(recurse=False):
            name = f"{mname}.{pname}" if mname else pname
            if id(p) not in trained or id(p) in seen:
                continue
            if not any(fnmatchcase(name, pat) or fnmatchcase(name, "*." + pat) for pat in patterns):
                continue
            if p.dim() < 2:  # a bias or norm vector: no crossbar row ("*.weight" skips the norms)
                continue
            seen.add(id(p))
            out.append((name, p, tuple(range(1, p.dim())) if conv and pname == "weight" else (-1,)))
    if not out:
        names = [n for n, p in trainable if p.dim() >= 2][:4]
        raise ConfigError(f"--weight-noise-on {','.join(patterns)} matches no trained weight matrix (vectors such "
                          f"as biases never get noise; some that would: {', '.join(names) or 'none'})")
    return out


@contextlib.contextmanager
def weight_noise(weights: List[Tuple[str, nn.Parameter, Tuple[int, ...]]], eta: float):
    """Inside: every weight w of `weights` is w + N(0, (eta * max|w| over its inputs)^2), one draw per
    element from torch's RNG (reseeded every step by the loop, so a resumed run draws the same noise);
    on leaving (also on an error) each is restored bit for bit. The loop runs the forward and backward
    inside, so the gradient is taken at the noisy weights and applied to the clean ones: noise injection
    as in hardware-aware training (aihwkit's), here with the per-row full scale of a crossbar column."""
    if eta == 0 or not weights:
        yield
        return
    saved = []
    try:
        with torch.no_grad():
            for _, p, dims in weights:
                saved.append(p.detach().clone())
                p.add_(torch.randn_like(p) * (eta * p.abs().amax(dim=dims, keepdim=True)))
        yield
    finally:
        with torch.no_grad():
            for (_, p, _), clean in zip(weights, saved):
                p.copy_(clean)


@contextlib.contextmanager
def drop_path(model: nn.Module, rate: float):
    """Stochastic depth on every timm-style block (drop_path1/drop_path2) for the duration: rate rising linearly
    from 0 at the first block to `rate` at the last (timm's rule), the modules put back afterwards. Warns when
    `rate` > 0 and the model has no such blocks."""
    blocks = [b for b in model.modules() if hasattr(b, "drop_path1") and hasattr(b, "drop_path2")]
    if rate <= 0:
        yield model
        return
    if not blocks:
        warnings.warn(f"drop-path {rate} not applied: {type(model).__name__} has no blocks with drop_path1/2 "
                      "(e.g. stage 1 isolated trains the FAR blocks alone)", stacklevel=3)
        yield model
        return
    from timm.layers import DropPath

    saved = [(b.drop_path1, b.drop_path2) for b in blocks]
    rates = torch.linspace(0, rate, len(blocks)).tolist()
    for b, r in zip(blocks, rates):
        b.drop_path1, b.drop_path2 = (DropPath(r), DropPath(r)) if r > 0 else (nn.Identity(), nn.Identity())
    try:
        yield model
    finally:
        for b, (p1, p2) in zip(blocks, saved):
            b.drop_path1, b.drop_path2 = p1, p2


# ---------------------------------------------------------------- task
class Task:
    """What a training command trains. Subclasses set `model` and override `loss` (and may override
    `trainable` and `regularizer`). `loss(model, x, y)` returns a dict of scalar tensors with "loss"."""

    name = "train"

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        self.model = model
        self.cfg = cfg

    def trainable(self) -> List[Tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def evaluated(self) -> nn.Module:
        """The classifier whose test accuracy the loop reports (default: the trained model itself; a task
        that trains parts of a model returns the whole model)."""
        return self.model

    def clip_groups(self) -> List[List[nn.Parameter]]:
        """Parameter groups whose gradient norms are clipped separately (cfg.grad_clip); default: one
        group of every trainable parameter. Independent problems (e.g. blocks trained in isolation)
        give one group each, so that one's gradient never rescales another's."""
        return [[p for _, p in self.trainable()]]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        loss = classification_loss(model(x), y, self.cfg.label_smoothing)
        return {"loss": loss, "ce": loss.detach()}

    def clean_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Optional[Dict[str, torch.Tensor]]:
        """Only under weight noise: terms taken at the clean weights, in a second forward and backward after
        the noisy one, their gradients added to its own before the step (a dict with "loss", like `loss`).
        None (the default): every term is in `loss`, at the noisy weights."""
        return None

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step (e.g. to re-apply a pruning mask)."""

    def state(self) -> dict:
        """Extra tensors/ints the task needs to resume (e.g. masks)."""
        return {}

    def load_state(self, state: dict) -> None:
        pass


# ---------------------------------------------------------------- checkpoints
def _identity(task: Task, cfg: TrainConfig, extra: dict) -> dict:
    """What must match for a resume to be the same run (anything else may change, e.g. --progress)."""
    return stage_identity(task.name, cfg, extra)


def stage_identity(task_name: str, cfg: TrainConfig, extra: dict) -> dict:
    """The settings a training stage of task `task_name` under `cfg` records (in last.pt, and in the model
    file a finished stage leaves for a resumed run to load) and a resume must match (identity_diff compares
    them as JSON reads them back)."""
    keep = ("epochs", "batch_size", "lr", "min_lr", "weight_decay", "warmup_epochs", "label_smoothing",
            "grad_clip", "ema", "seed", "augment", "limit")
    recipe = ("mixup", "cutmix", "rand_augment", "reprob", "repeated_aug", "drop_path", "lr_scale_batch",
              "weight_noise", "weight_noise_on")
    base = TrainConfig()  # the DeiT options join only when set: runs saved before they existed still resume
    return {"task": task_name, **{k: getattr(cfg, k) for k in keep},
            **{k: getattr(cfg, k) for k in recipe if getattr(cfg, k) != getattr(base, k)}, **extra}


def identity_diff(got: dict, ident: dict) -> Dict[str, Tuple[Any, Any]]:
    """{setting: (recorded, now)} for every setting of `ident` that `got` (a recorded identity, read from JSON)
    differs in, `ident` taken as JSON reads it back (int keys become strings, tuples lists: the one place
    identities are normalized); keys of OPTIONAL_IDENTITY that `got` lacks (recorded by an older version) are
    not differences."""
    ident = json.loads(json.dumps(ident))
    return {k: (got.get(k), v) for k, v in ident.items() if got.get(k) != v
            and not (k in OPTIONAL_IDENTITY and k not in got)}


def check_stage_file(path, recorded, ident: dict) -> None:
    """Before a resumed run loads the model a finished stage left at `path`: ConfigError unless the identity
    recorded with it (its metadata's "run_identity"; files written before it was recorded have none and
    pass) matches `ident`, the settings this run would have made it with."""
    if recorded is None:
        return
    diff = identity_diff(recorded if isinstance(recorded, dict) else {}, ident)
    if diff:
        raise ConfigError(f"--resume: {path} was made by a different run; differing settings (file, now): "
                          + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items())
                          + "; resume with that run's settings, or pass -f/--force (force=True in TrainConfig) "
                            "to start over")


def load_finished_stage(path, ident: dict, device) -> nn.Module:
    """The model a finished stage left at `path` (far.load), on `device`, once check_stage_file has found the
    identity recorded with it to be `ident`: what a resumed multi-stage run continues from."""
    from far.models import load

    model = load(path)
    check_stage_file(path, model.far_checkpoint["metadata"].get("run_identity"), ident)
    return model.to(device)


def stage_record(seconds: float, steps: int, histories: List[List[dict]]) -> dict:
    """What a finished stage's file keeps of the training that made it (its metadata "result"), so that a
    resumed run that loads the file still counts that training in its report: seconds, optimizer steps and
    the histories (a JSON string: a history may hold NaN, which the file's strict JSON cannot)."""
    return {"seconds": round(float(seconds), 3), "steps": int(steps), "histories": json.dumps(histories)}


def finished_stage_record(model: nn.Module) -> Tuple[float, int, List[List[dict]]]:
    """(seconds, steps, histories) that stage_record stored with a finished stage's model (load_finished_stage);
    (0.0, 0, []) for a file written before it was recorded."""
    rec = model.far_checkpoint["metadata"].get("result")
    try:
        histories = json.loads(rec["histories"])
        if not (isinstance(histories, list) and all(isinstance(h, list) for h in histories)):
            raise ValueError
        return float(rec["seconds"]), int(rec["steps"]), histories
    except (TypeError, KeyError, ValueError):
        return 0.0, 0, []


def limit_data(cfg: TrainConfig, train_data, eval_data):
    """(train_data, eval_data) cut to cfg.limit / cfg.eval_limit images (the first ones; far.data.first):
    what a method trains and tests on, from the API as from the command line."""
    from far.data import first

    return first(train_data, cfg.limit), first(eval_data, cfg.eval_limit)


def _tensor_problems(what: str, got, want: Dict[str, torch.Tensor]) -> List[str]:
    """Mismatches of a {name: tensor} dict from a file against the live {name: tensor} it must fit."""
    if not isinstance(got, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in got.items()):
        return [f"{what} is not a dict of tensors"]
    problems = []
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing:
        problems.append(f"{what}: missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
    if extra:
        problems.append(f"{what}: unexpected {', '.join(extra[:3])}" + (" ..." if len(extra) > 3 else ""))
    for k in sorted(set(want) & set(got)):
        if got[k].shape != want[k].shape or got[k].dtype != want[k].dtype:
            problems.append(f"{what}.{k} is {got[k].dtype} {list(got[k].shape)}, expected {want[k].dtype} "
                            f"{list(want[k].shape)}")
    return problems


def load_state(ckpt: Path, ident: dict, total: int, model: nn.Module, opt: torch.optim.Optimizer,
               ema: Optional[EMA], task: Task, device: torch.device,
               scaler: Optional[torch.amp.GradScaler] = None) -> Tuple[int, List[dict]]:
    """Resume from `ckpt` (last.pt): validate all of it against this run, then load the model, optimizer,
    EMA, task and (fp16) loss-scaler state in place and return (step, history). Every problem with the file is one
    CheckpointError (ConfigError when it belongs to a different run); nothing is loaded unless all fits."""
    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"--resume: {ckpt}: {msg}; to start over, run with -f/--force instead of --resume "
                               "(or delete it)")

    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file is a user-facing problem
        raise bad(f"cannot read it ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise bad("not a far training checkpoint of this version")
    keys = {"identity": dict, "step": int, "model": dict, "optimizer": dict, "ema": dict, "task": dict, "history": str}
    for key, kind in keys.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise bad(f"'{key}' is missing or not of type {kind.__name__}")
    try:
        got = json.loads(state["identity"].get("json"))
        history = json.loads(state["history"])
    except (TypeError, ValueError, RecursionError):
        raise bad("its identity or history is not valid JSON") from None
    if not isinstance(got, dict) or not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise bad("its identity must be a JSON object and its history a list of objects")
    diff = identity_diff(got, ident)  # train_images joined later: a state written before it still resumes
    if diff:
        raise ConfigError(f"--resume: {ckpt} belongs to a different run; differing settings (checkpoint, now): "
                          + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items()))
    step = state["step"]
    if not 0 <= step <= total:
        raise bad(f"its step {step} is outside this run's [0, {total}] steps")
    problems = _tensor_problems("model", state["model"], model.state_dict())
    if ema is not None:
        problems += _tensor_problems("ema", state["ema"], ema.shadow)
    live_task = {k: v for k, v in task.state().items() if isinstance(v, torch.Tensor)}
    got_task = state["task"]
    problems += _tensor_problems("task", {k: v for k, v in got_task.items() if k in live_task},
                                 {k: v for k, v in live_task.items() if k in got_task})
    for k, v in got_task.items():
        if isinstance(v, torch.Tensor) and not v.is_floating_point() and v.numel() and int(v.min()) < 0:
            problems.append(f"task.{k} holds negative values")
    opt_state = state["optimizer"]
    params = [p for group in opt.param_groups for p in group["params"]]
    groups, per_param = opt_state.get("param_groups"), opt_state.get("state")
    if not (isinstance(groups, list) and isinstance(per_param, dict) and len(groups) == len(opt.param_groups)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        problems.append("optimizer state does not have this run's parameter groups")
    elif [len(g["params"]) for g in groups] != [len(g["params"]) for g in opt.param_groups]:
        problems.append("optimizer state does not have this run's parameter groups")
    else:
        index = [i for g in groups for i in g["params"]]
        ints = all(isinstance(i, int) and not isinstance(i, bool) for i in index)
        where = dict(zip(index, params)) if ints and len(set(index)) == len(index) else {}
        if not where:
            problems.append("optimizer parameter indices are not distinct ints")
        for i, entry in per_param.items():
            if i not in where or not isinstance(entry, dict):
                problems.append(f"optimizer state for unknown parameter {i!r}")
                break
            for name, t in entry.items():
                if not isinstance(t, torch.Tensor):
                    continue
                if name == "step":
                    ok = t.numel() == 1 and bool(torch.isfinite(t).all()) and float(t) >= 0
                else:
                    ok = t.shape == where[i].shape and t.is_floating_point()
                if not ok:
                    problems.append(f"optimizer state '{name}' of parameter {i} does not fit it "
                                    f"({list(t.shape)} vs {list(where[i].shape)})")
                    break
    scaled = state.get("scaler")
    if scaler is not None and scaled is not None:  # absent: written by a version before it was kept
        scale, tracker = (scaled.get("scale"), scaled.get("_growth_tracker")) if isinstance(scaled, dict) else (None, None)
        if not (isinstance(scale, float) and math.isfinite(scale) and scale > 0
                and isinstance(tracker, int) and not isinstance(tracker, bool) and tracker >= 0):
            problems.append("its loss scaler state is not a positive finite scale and a count")
    if problems:
        raise bad("it does not fit this run: " + "; ".join(problems[:5])
                  + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""))
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(opt_state)
        if ema is not None:
            ema.shadow = {k: v.to(device) for k, v in state["ema"].items()}
        task.load_state(got_task)
        if scaler is not None and scaled is not None:
            scaler.load_state_dict(scaled)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise bad(f"cannot load it ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    return step, history


UNREADABLE = "a training state that cannot be read"


def _unfinished(ckpt: Path) -> Optional[str]:
    """How far the run whose state `ckpt` (a last.pt) holds got ("step 2 of 8"), or None when that run
    finished. State that cannot be read, or written before the state recorded its run's length, counts
    as unfinished: only a run known to be done is replaced without being asked."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - whatever it is, it is not known to be finished
        return UNREADABLE
    step, total = (state.get("step"), state.get("total")) if isinstance(state, dict) else (None, None)
    if not (isinstance(step, int) and not isinstance(step, bool)):
        return UNREADABLE
    if not (isinstance(total, int) and not isinstance(total, bool)):
        return f"at step {step}; this state does not say whether the run finished"
    return None if step >= total else f"stopped at step {step} of {total}"


def check_fresh_run(cfg: TrainConfig, stages: bool = True) -> None:
    """Before a new run (not cfg.resume, not cfg.force) starts in cfg.out_dir: ConfigError if the folder
    holds the state (last.pt) of a run that did not finish, which starting over would replace (and its
    metrics.jsonl with it). stages=True looks into the stage folders of multi-stage methods too
    (<out>/stage1, <out>/round1/reg): a method's caller checks all of them before its first stage. A
    finished run's folder is reused as before. With cfg.force (-f) that state is what the new run replaces:
    it is removed with its metrics.jsonl, also in the folder of a stage this run skips (e.g. 0 epochs), whose
    state would otherwise outlive the -f and refuse every later run."""
    if cfg.out_dir is None or cfg.resume:
        return
    out = Path(cfg.out_dir)
    patterns = (CKPT_NAME, f"*/{CKPT_NAME}", f"*/*/{CKPT_NAME}") if stages else (CKPT_NAME,)
    for pattern in patterns:
        for ckpt in sorted(out.glob(pattern)):
            why = _unfinished(ckpt) if ckpt.is_file() else None
            if why is not None and cfg.force:  # every process of a torchrun may get here: missing_ok
                ckpt.unlink(missing_ok=True)
                (ckpt.parent / METRICS_NAME).unlink(missing_ok=True)
                continue
            if why == UNREADABLE:  # --resume would refuse it too: only starting over helps
                raise ConfigError(f"{ckpt}: {why}; pass -f/--force (force=True in TrainConfig) to start over in "
                                  f"{out} (its state and metrics are replaced)")
            if why is not None:
                raise ConfigError(f"{ckpt}: an unfinished run's state ({why}); continue it with --resume "
                                  f"(and its settings), or pass -f/--force (force=True in TrainConfig) to start over "
                                  f"in {out} (its state and metrics are replaced)")


def check_resumable(cfg: TrainConfig) -> None:
    """Before a multi-stage method resumes (cfg.resume) in cfg.out_dir: ConfigError when neither the folder nor its
    stage folders hold anything of a run (a last.pt, a finished stage's model file). Each stage resumes only if its
    own folder holds state (stage_config), so without this check a --resume in a mistyped or empty folder started
    the whole run over as a new one, where one-stage runs (train) refuse it."""
    if cfg.out_dir is None or not cfg.resume:
        return
    out = Path(cfg.out_dir)
    patterns = (CKPT_NAME, f"*/{CKPT_NAME}", f"*/*/{CKPT_NAME}", "*.safetensors", "*/*.safetensors")
    if not any(p.is_file() for pattern in patterns for p in out.glob(pattern)):
        raise ConfigError(f"--resume: no run to resume in {out} (no {CKPT_NAME} or finished stage's model in it or "
                          "its stage folders); run without --resume to start")


# ---------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    model: nn.Module
    history: List[dict]
    final_accuracy: Optional[float]
    seconds: float
    steps: int
    out_dir: Optional[Path]
    completed: bool  # False when stopped by max_steps


def _mean_over_processes(values: Dict[str, float], d: Dist) -> Dict[str, float]:
    """The logged loss terms averaged over the processes of a torchrun (each saw its own share of the batch;
    every process logs the same keys at the same steps); as they are with one process."""
    if d.world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return {k: v / d.world for k, v in zip(keys, t.tolist())}


NO_DECAY_SUFFIXES = ("bias", "b_ih", "b_hh", "head_proj_bias", "pos_embed", "cls_token")


def _decays(name: str, p: nn.Parameter) -> bool:
    """Weight decay for weight matrices only: not for 1-D parameters (norms), biases under any storage (a
    padded FAR block keeps its LSTM and head_proj biases as [H, 2, 4n] / [H, d] tensors), position
    embeddings or the class token."""
    return p.dim() >= 2 and not name.endswith(NO_DECAY_SUFFIXES)


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "fp16":
        return torch.float16
    return torch.bfloat16


# identity keys a state written by an older version may lack
OPTIONAL_IDENTITY = ("train_images", "prune_ratio", "threshold", "transform", "ridge", "ce_weight", "kd_weight",
                     "kd_temperature", "new_student", "before")
_BEFORE_FIRST_RUN: List = []  # callables for the next train() to call once its checks have passed


def before_first_run(fn) -> None:
    """Have the next train() call fn() once, after every check before its first step (the method's own checks
    run before it): how the command line says what a user should know before a run, and nothing when the run
    is refused instead. clear_before_first_run() drops what was not called."""
    _BEFORE_FIRST_RUN.append(fn)


def clear_before_first_run() -> None:
    _BEFORE_FIRST_RUN.clear()


def _save_to_file(obj, path: str) -> None:
    """torch.save through a Python file object: a write the OS refuses (a full disk, a quota) then stays the
    cause of torch's own error, which atomic_write reports as an OSError for the destination; given a path,
    torch's C++ writer says only "unexpected pos"."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def train(task: Task, train_set, eval_set, cfg: TrainConfig, d: Dist, identity: Optional[dict] = None,
          desc: str = "train") -> TrainResult:
    """Run `task` for cfg.epochs over `train_set`, evaluating on `eval_set` (may be None) after each
    epoch. With cfg.out_dir: writes <out_dir>/last.pt (resumable state) and metrics.jsonl. Returns the
    trained (EMA, if enabled) model, unwrapped."""
    cfg.validate()
    check_fresh_run(cfg, stages=False)
    train_set, eval_set = limit_data(cfg, train_set, eval_set)
    out = Path(cfg.out_dir) if cfg.out_dir is not None else None
    write = out is not None and d.main  # this process writes the run's files
    model = task.model.to(d.device)
    data = TrainData(train_set, cfg.batch_size, d, cfg.seed, cfg.augment, cfg.workers,
                     rand_augment=cfg.rand_augment, reprob=cfg.reprob, repeated_aug=cfg.repeated_aug)
    mix = make_mixup(cfg, getattr(task.evaluated(), "num_classes", None))
    param = next(model.parameters(), None)
    x_dtype = param.dtype if param is not None and param.is_floating_point() else None  # as far.evaluate casts
    checked_input = False
    peak_lr = effective_lr(cfg.lr, cfg, d.world)
    min_lr = min(cfg.min_lr, peak_lr)
    spe = data.steps_per_epoch
    total = max(1, int(round(cfg.epochs * spe)))
    if cfg.ema > 0 and total < 1.0 / (1.0 - cfg.ema):
        warnings.warn(f"{desc}: EMA decay {cfg.ema} averages over ~{1.0 / (1.0 - cfg.ema):.0f} steps but the run has "
                      f"{total}: the returned (EMA) weights stay close to the starting ones; lower --ema or 0",
                      stacklevel=2)
    warmup = int(round(cfg.warmup_epochs * spe))
    named = task.trainable()
    clip_groups = task.clip_groups()
    if not named:
        raise ConfigError(f"{desc}: nothing to train (no parameter requires a gradient)")
    noisy = noisy_weights(model, named, noise_patterns(cfg.weight_noise_on)) if cfg.weight_noise > 0 else []
    decay = [p for n, p in named if _decays(n, p)]
    no_decay = [p for n, p in named if not _decays(n, p)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999))
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    ident = _identity(task, cfg, identity or {})
    ident["world"] = d.world
    ident["train_images"] = len(train_set)  # another training set changes the steps and the schedule
    amp = _amp_dtype(cfg, d.device)
    # fp16 gradients need loss scaling on any device (a "cuda" scaler on CPU disables itself with a warning)
    scaler = torch.amp.GradScaler(d.device.type) if amp == torch.float16 else None
    step, history = 0, []
    ckpt = out / CKPT_NAME if out is not None else None
    metrics = out / METRICS_NAME if out is not None else None
    if ckpt is not None and os.path.lexists(ckpt) and not ckpt.is_file():  # found now, not at the first save
        raise ConfigError(f"{ckpt} is not a file: the run keeps its state under that name; move it away")
    if cfg.resume and not ckpt.is_file():
        raise ConfigError(f"--resume: no checkpoint at {ckpt} (run without --resume to start)")
    if write:  # after the refusals above (data smaller than a batch, nothing to train): none leaves a folder
        make_folder(out, "out_dir")
    d.barrier()
    if cfg.resume:
        step, history = load_state(ckpt, ident, total, model, opt, ema, task, d.device, scaler)
        if write:  # rows logged after the state was saved would be logged again: the log is the state's history
            atomic_write(metrics, "".join(json.dumps(strict_json(r)) + "\n" for r in history))
    elif write and metrics.exists():
        metrics.unlink()  # a fresh run starts a fresh log (check_fresh_run: not an unfinished run's)
    ddp = model
    if d.world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
            find_unused_parameters=False)

    def save_state():
        if not write:
            return
        state = {"version": STATE_VERSION, "identity": {"json": json.dumps(ident)}, "step": step, "total": total,
                 "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "ema": ema.shadow if ema is not None else {}, "task": task.state(),
                 "history": json.dumps(history)}
        if scaler is not None:  # fp16: the loss scale it has found (a resumed run goes on with it)
            state["scaler"] = scaler.state_dict()
        atomic_write(ckpt, lambda tmp: _save_to_file(state, tmp))

    while _BEFORE_FIRST_RUN:
        _BEFORE_FIRST_RUN.pop(0)()
    bar = None
    if d.main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, unit="step", desc=desc, file=sys.stderr, dynamic_ncols=True)
    run_seconds = sum(r.get("seconds", 0.0) for r in history if r.get("kind") == "epoch")
    t_epoch = time.perf_counter()
    stop_at = total if cfg.max_steps is None else min(total, cfg.max_steps)
    acc = None
    sums: Dict[str, float] = {}
    count = 0
    regularized = contextlib.ExitStack()  # drop-path on the model's blocks for this run only
    regularized.enter_context(drop_path(model, cfg.drop_path))
    model.train()
    try:  # drop-path leaves the blocks and the bar closes however the run ends
        while step < stop_at:
            epoch, start = divmod(step, spe)
            for x, y in data.epoch(epoch, start):
                torch.manual_seed(_step_seed(cfg.seed, step, d.rank))
                lr = lr_at(step, total, warmup, peak_lr, min_lr)
                if not checked_input:  # images that do not fit: the clear error, not a conv's shape error
                    check_input(task.evaluated(), x.shape, "the training data")
                    checked_input = True
                if x_dtype is not None and x.is_floating_point() and x.dtype != x_dtype:
                    x = x.to(x_dtype)  # a bf16 / float64 model takes its own dtype
                check_labels(task.evaluated(), y, f"{desc}, step {step}")
                if mix is not None:
                    x, y = apply_mixup(mix, x, y, _step_seed(cfg.seed, step, d.rank) + 3)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.zero_grad(set_to_none=True)
                with weight_noise(noisy, cfg.weight_noise):  # forward and backward at the noisy weights
                    losses = _forward_backward(task.loss, ddp, x, y, d, amp, scaler, desc, step, lr)
                if noisy:  # the clean weights are back: the terms a task takes at them (gradients add up)
                    clean = _forward_backward(task.clean_loss, ddp, x, y, d, amp, scaler, desc, step, lr)
                    if clean is not None:
                        losses = {**losses, **{k: v for k, v in clean.items() if k != "loss"},
                                  "loss": losses["loss"].detach() + clean["loss"].detach()}
                loss = losses["loss"]
                if scaler is not None:
                    scaler.unscale_(opt)
                if cfg.grad_clip > 0:
                    for group in clip_groups:
                        nn.utils.clip_grad_norm_(group, cfg.grad_clip)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                task.after_step(model)
                if ema is not None:
                    ema.update(model)
                step += 1
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                count += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{lr:.2e}", refresh=False)
                if step % cfg.log_every == 0 or step == stop_at:
                    means = _mean_over_processes({k: v / count for k, v in sums.items()}, d)
                    row = {"kind": "step", "step": step, "epoch": step / spe, "lr": lr, **means}
                    history.append(row)
                    if write:
                        append_jsonl(metrics, row)
                    sums, count = {}, 0
                end_of_epoch = step % spe == 0 or step == total
                if end_of_epoch:
                    seconds = time.perf_counter() - t_epoch
                    run_seconds += seconds
                    acc = None
                    if eval_set is not None:
                        ctx = ema.applied(model) if ema is not None else contextlib.nullcontext(model)
                        with ctx:
                            acc = accuracy(task.evaluated(), eval_set, batch_size=cfg.eval_batch_size, device=d.device)
                    row = {"kind": "epoch", "step": step, "epoch": step / spe, "seconds": seconds,
                           "accuracy": acc}
                    history.append(row)
                    if write:
                        append_jsonl(metrics, row)
                    if bar is not None:
                        bar.write(f"{desc}: epoch {step / spe:.2f}  "
                                  + (f"test acc {100 * acc:.2f}%  " if acc is not None else "")
                                  + f"({seconds:.0f} s)")
                    t_epoch = time.perf_counter()
                if step % cfg.ckpt_every == 0 or end_of_epoch or step == stop_at:
                    save_state()
                    d.barrier()
                if step >= stop_at:
                    break
    finally:
        regularized.close()
        if bar is not None:
            bar.close()
    completed = step >= total
    if ema is not None and completed:
        model.load_state_dict(ema.shadow, strict=False)
    if completed and eval_set is not None and (acc is None or ema is not None):
        acc = accuracy(task.evaluated(), eval_set, batch_size=cfg.eval_batch_size, device=d.device)
    if acc is None and completed:
        acc = next((r["accuracy"] for r in reversed(history) if r.get("kind") == "epoch"), None)
    return TrainResult(model=model, history=history, final_accuracy=acc,
                       seconds=run_seconds + (time.perf_counter() - t_epoch if not completed else 0.0),
                       steps=step, out_dir=out, completed=completed)


# ---------------------------------------------------------------- run records
def plot_history(history: List[dict], path: Path, title: str) -> Optional[str]:
    """Loss curves (per logged step) and test accuracy (per epoch) as one PNG; None on success, else why not."""
    plt = pyplot()
    if plt is None:
        return "matplotlib is not installed"
    steps = [r for r in history if r.get("kind") == "step"]
    epochs = [r for r in history if r.get("kind") == "epoch" and r.get("accuracy") is not None]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    keys = list(dict.fromkeys(k for r in steps for k in r if k not in ("kind", "step", "epoch", "lr", "stage")))
    for k in keys:
        rows = [r for r in steps if k in r and r[k] is not None and r[k] > 0]
        a.plot([r["epoch"] for r in rows], [r[k] for r in rows], label=k, lw=0.8 if k.startswith("cos_b") else 1.5)
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.set_yscale("log")
    if keys:  # a run with no logged step (e.g. a prune with no training epoch) has no curves to name
        a.legend(fontsize=8)
    a.grid(alpha=0.3)
    b.plot([r["epoch"] for r in epochs], [100 * r["accuracy"] for r in epochs], "o-")
    for r in history:
        if r.get("kind") == "stage":
            for ax in (a, b):
                ax.axvline(r["epoch"], color="gray", ls="--", lw=0.8)
    b.set_xlabel("epoch")
    b.set_ylabel("test top-1 (%)")
    b.grid(alpha=0.3)
    fig.suptitle(title)
    save_figure(fig, path)
    return None


def join_histories(*parts: List[dict]) -> List[dict]:
    """One history from consecutive stages: epochs offset so the curves continue, a "stage" marker between."""
    out: List[dict] = []
    offset = 0.0
    for i, h in enumerate(parts):
        if i and out:
            out.append({"kind": "stage", "epoch": offset, "stage": i + 1})
        out += [{**r, "epoch": r.get("epoch", 0.0) + offset, "stage": i + 1} for r in h]
        offset = max((r["epoch"] for r in out if "epoch" in r), default=offset)
    return out


@dataclass
class RunReport:
    """What a method's run did, attached to the model it returns as `model.far_run`: the metrics
    history, final test accuracy (None without test data), seconds, optimizer steps, whether it
    finished (False: stopped by max_steps; resume it), the run folder (None: nothing written), and
    rows for a summary table ((label, text) pairs)."""
    command: str
    history: List[dict]
    accuracy: Optional[float]
    seconds: float
    steps: int
    completed: bool
    out_dir: Optional[str]
    rows: List[Tuple[str, str]] = field(default_factory=list)


def run_metadata(command: str, cfg: TrainConfig, d: Dist, result: TrainResult, **extra) -> dict:
    """JSON metadata for the checkpoint of a trained model: how it was trained, on what, how long."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items()
              if k not in ("progress", "resume", "force", "out_dir")}
    return {"training": {"command": command, "config": config, "processes": d.world,
                         "device": device_name(d.device), "threads": torch.get_num_threads(),
                         "seconds": round(result.seconds, 1), "steps": result.steps,
                         "test_accuracy": result.final_accuracy,
                         "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            **extra}


def stage_config(cfg: TrainConfig, name: str, **changes) -> TrainConfig:
    """The config of one stage of a multi-stage method: its own run folder <out_dir>/<name> (None
    stays None), resumed only if that folder holds state."""
    out = None if cfg.out_dir is None else os.path.join(cfg.out_dir, name)
    resume = cfg.resume and out is not None and (Path(out) / CKPT_NAME).is_file()
    return dataclasses.replace(cfg, out_dir=out, resume=resume, **changes)


__all__ = ["Dist", "EMA", "RunReport", "Task", "TrainConfig", "TrainData", "TrainResult", "apply_mixup",
           "check_fresh_run", "check_resumable", "check_stage_file", "classification_loss", "cleanup_distributed",
           "drop_path",
           "effective_lr", "finished_stage_record", "identity_diff", "join_histories", "limit_data",
           "load_finished_stage", "lr_at",
           "make_mixup", "noise_patterns", "noisy_weights", "plot_history", "run_metadata", "setup_distributed",
           "stage_config", "stage_identity", "stage_record", "train", "weight_noise"]
