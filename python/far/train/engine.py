"""The training loop every `far` training command runs on: one process or many under torchrun.

What it gives each command (teacher, distill, prune, finetune):
- DistributedDataParallel when launched by `torchrun` (NCCL on GPUs, gloo on CPUs) with a
  DistributedSampler; one process otherwise. batch_size is per process.
- AdamW, linear warm-up then cosine decay (per step), label smoothing, gradient clipping, optional
  EMA of the weights, bf16 autocast on GPUs.
- Determinism that survives a kill: the data order is DistributedSampler(seed, epoch), and every
  step reseeds torch's RNG (dropout, drop-path, augmentation) from (seed, step, rank), so a run
  resumed from a checkpoint takes exactly the steps the uninterrupted run would have taken.
- Atomic checkpoints every `ckpt_every` steps and at each epoch end (`<out>/last.pt`: tensors,
  ints and strings only, loaded with weights_only=True), `resume=True` continues from it.
- JSON-lines metrics (`<out>/metrics.jsonl`), progress bars, a summary table and a PNG of the
  loss / accuracy curves at the end (rank 0 writes).

A command supplies a `Task`: the model to train, which parameters train, and `loss(batch)` returning
a dict of scalar tensors with a "loss" key (timm's distillation task style).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

CKPT_NAME = "last.pt"
METRICS_NAME = "metrics.jsonl"
STATE_VERSION = 1


class TrainError(ValueError):
    """A user error in a training setup (bad option, data that does not fit, a checkpoint from another run)."""


@dataclass
class TrainConfig:
    """Options shared by every training command (the CLI flags of the same names).

    epochs may be fractional (e.g. 0.5 = half an epoch); warmup_epochs likewise. max_steps stops
    the run early after that many optimizer steps (its state is saved: useful to split a run)."""
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
    out_dir: str = "far-run"
    resume: bool = False

    def validate(self) -> "TrainConfig":
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
        ]
        for ok, msg in checks:
            if not ok:
                raise TrainError(msg)
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
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPUs, gloo on CPUs) and pick the
    device: `device` if given, else cuda:<LOCAL_RANK> when a GPU is present, else cpu."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None or device == "auto":
        dev = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"device {dev} requested but no CUDA GPU is available")
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local, device=dev)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- data
def _step_seed(seed: int, step: int, rank: int) -> int:
    """A per-(run seed, step, rank) seed: reseeding every step makes resumed runs take identical steps."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729 + 12_345) % (2 ** 63 - 1)


class TrainData:
    """Training batches for one process: indices from DistributedSampler(seed, epoch), shard `rank`
    of `world`; in-memory fast path (uint8 gather + batched augmentation) for Fashion-MNIST,
    a DataLoader over the shard for image folders. drop_last: every step has a full batch."""

    def __init__(self, dataset, batch_size: int, d: Dist, seed: int, augment: bool, workers: int = 0):
        from far.data import RandomShiftFlip

        self.dataset = dataset
        self.batch_size = batch_size
        self.d = d
        self.seed = seed
        self.workers = workers
        self.fast = hasattr(dataset, "images") and hasattr(dataset, "normalize")
        self.augment = RandomShiftFlip(pad=2, flip=0.5) if (augment and self.fast) else None
        n = len(dataset)
        per_rank = math.ceil(n / d.world)
        self.steps_per_epoch = per_rank // batch_size
        if self.steps_per_epoch < 1:
            raise TrainError(f"the training set has {n} images: fewer than one batch of {batch_size} per process "
                             f"({d.world} process(es)); lower --batch-size or use more data")

    def _indices(self, epoch: int) -> List[int]:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(range(len(self.dataset)), num_replicas=self.d.world, rank=self.d.rank,
                                     shuffle=True, seed=self.seed, drop_last=False)
        sampler.set_epoch(epoch)
        return list(iter(sampler))

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Batches [start_step, steps_per_epoch) of `epoch` on the process's device."""
        idx = self._indices(epoch)[start_step * self.batch_size:self.steps_per_epoch * self.batch_size]
        dev = self.d.device
        if self.fast:
            images, targets = self.dataset._on(dev)
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
        subset = torch.utils.data.Subset(self.dataset, idx)
        loader = torch.utils.data.DataLoader(subset, batch_size=self.batch_size, shuffle=False, drop_last=True,
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

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        loss = F.cross_entropy(model(x), y, label_smoothing=self.cfg.label_smoothing)
        return {"loss": loss, "ce": loss.detach()}

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step (e.g. to re-apply a pruning mask)."""

    def state(self) -> dict:
        """Extra tensors/ints the task needs to resume (e.g. masks)."""
        return {}

    def load_state(self, state: dict) -> None:
        pass


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int, d: Dist) -> float:
    """Top-1 accuracy of `model` on `dataset` (every process takes a strided shard, results summed)."""
    from far.data import iterate_batches

    was = model.training
    model.eval()
    if d.world > 1:
        dataset = torch.utils.data.Subset(dataset, range(d.rank, len(dataset), d.world)) \
            if not hasattr(dataset, "images") else _shard_fmnist(dataset, d)
    correct = torch.zeros((), dtype=torch.float64, device=d.device)
    total = torch.zeros((), dtype=torch.float64, device=d.device)
    dtype = next(model.parameters()).dtype
    for x, y in iterate_batches(dataset, batch_size, device=d.device):
        correct += (model(x.to(dtype)).argmax(-1) == y).sum()
        total += y.numel()
    d.all_sum(correct)
    d.all_sum(total)
    model.train(was)
    return float(correct / total.clamp_min(1))


def _shard_fmnist(ds, d: Dist):
    import copy

    shard = copy.copy(ds)
    shard.images = ds.images[d.rank::d.world]
    shard.targets = ds.targets[d.rank::d.world]
    shard._device_images = {}
    return shard


# ---------------------------------------------------------------- checkpoints
def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _identity(task: Task, cfg: TrainConfig, extra: dict) -> dict:
    """What must match for a resume to be the same run (anything else may change, e.g. --progress)."""
    keep = ("epochs", "batch_size", "lr", "min_lr", "weight_decay", "warmup_epochs", "label_smoothing",
            "grad_clip", "ema", "seed", "augment", "limit")
    return {"task": task.name, **{k: getattr(cfg, k) for k in keep}, **extra}


# ---------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    model: nn.Module
    history: List[dict]
    final_accuracy: Optional[float]
    seconds: float
    steps: int
    out_dir: Path
    completed: bool  # False when stopped by max_steps


def _jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "fp16":
        return torch.float16
    return torch.bfloat16


def train(task: Task, train_set, eval_set, cfg: TrainConfig, d: Dist, identity: Optional[dict] = None,
          desc: str = "train") -> TrainResult:
    """Run `task` for cfg.epochs over `train_set`, evaluating on `eval_set` (may be None) after each
    epoch. Writes <out_dir>/last.pt (resumable state) and metrics.jsonl; returns the trained (EMA, if
    enabled) model, unwrapped."""
    cfg.validate()
    out = Path(cfg.out_dir)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    d.barrier()
    model = task.model.to(d.device)
    data = TrainData(train_set, cfg.batch_size, d, cfg.seed, cfg.augment, cfg.workers)
    spe = data.steps_per_epoch
    total = max(1, int(round(cfg.epochs * spe)))
    warmup = int(round(cfg.warmup_epochs * spe))
    named = task.trainable()
    if not named:
        raise TrainError(f"{desc}: nothing to train (no parameter requires a gradient)")
    decay = [p for n, p in named if p.dim() >= 2 and not n.endswith(("pos_embed", "cls_token"))]
    no_decay = [p for n, p in named if not (p.dim() >= 2 and not n.endswith(("pos_embed", "cls_token")))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999))
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    ident = _identity(task, cfg, identity or {})
    ident["world"] = d.world
    step, history = 0, []
    ckpt = out / CKPT_NAME
    metrics = out / METRICS_NAME
    if cfg.resume:
        if not ckpt.is_file():
            raise TrainError(f"--resume: no checkpoint at {ckpt} (run without --resume to start)")
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged file is a user-facing problem
            raise TrainError(f"--resume: cannot read {ckpt}: {type(e).__name__}: {e}") from e
        if state.get("version") != STATE_VERSION or not isinstance(state.get("identity"), dict):
            raise TrainError(f"--resume: {ckpt} is not a far training checkpoint of this version")
        got = json.loads(state["identity"]["json"])
        diff = {k: (got.get(k), v) for k, v in ident.items() if got.get(k) != v}
        if diff:
            raise TrainError(f"--resume: {ckpt} belongs to a different run; differing settings (checkpoint, now): "
                             + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items()))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.shadow = {k: v.to(d.device) for k, v in state["ema"].items()}
        task.load_state(state.get("task", {}))
        step = int(state["step"])
        history = json.loads(state["history"])
    elif d.main and metrics.exists():
        metrics.unlink()  # a fresh run starts a fresh log
    ddp = model
    if d.world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
            find_unused_parameters=False)
    amp = _amp_dtype(cfg, d.device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None

    def save_state():
        if not d.main:
            return
        state = {"version": STATE_VERSION, "identity": {"json": json.dumps(ident)}, "step": step,
                 "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "ema": ema.shadow if ema is not None else {}, "task": task.state(),
                 "history": json.dumps(history)}
        _atomic_torch_save(state, ckpt)

    bar = None
    if d.main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, unit="step", desc=desc, file=sys.stderr, dynamic_ncols=True)
    t_start = time.perf_counter()
    run_seconds = sum(r.get("seconds", 0.0) for r in history if r.get("kind") == "epoch")
    t_epoch = time.perf_counter()
    stop_at = total if cfg.max_steps is None else min(total, cfg.max_steps)
    acc = None
    sums: Dict[str, float] = {}
    count = 0
    model.train()
    while step < stop_at:
        epoch, start = divmod(step, spe)
        for x, y in data.epoch(epoch, start):
            torch.manual_seed(_step_seed(cfg.seed, step, d.rank))
            lr = lr_at(step, total, warmup, cfg.lr, cfg.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast(d.device.type, dtype=amp, enabled=amp is not None):
                losses = task.loss(ddp, x, y)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise TrainError(f"{desc}: the loss became {float(loss)} at step {step} (lr {lr:.3g}); "
                                 "lower --lr or check the data")
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_([p for _, p in named], cfg.grad_clip)
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
                row = {"kind": "step", "step": step, "epoch": step / spe, "lr": lr,
                       **{k: v / count for k, v in sums.items()}}
                history.append(row)
                if d.main:
                    _jsonl(metrics, row)
                sums, count = {}, 0
            end_of_epoch = step % spe == 0 or step == total
            if end_of_epoch:
                seconds = time.perf_counter() - t_epoch
                run_seconds += seconds
                acc = None
                if eval_set is not None:
                    ctx = ema.applied(model) if ema is not None else contextlib.nullcontext(model)
                    with ctx as m:
                        acc = evaluate(m, eval_set, cfg.eval_batch_size, d)
                row = {"kind": "epoch", "step": step, "epoch": step / spe, "seconds": seconds,
                       "accuracy": acc}
                history.append(row)
                if d.main:
                    _jsonl(metrics, row)
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
    if bar is not None:
        bar.close()
    completed = step >= total
    if ema is not None and completed:
        model.load_state_dict(ema.shadow, strict=False)
    if completed and eval_set is not None and (acc is None or ema is not None):
        acc = evaluate(model, eval_set, cfg.eval_batch_size, d)
    if acc is None and completed:
        acc = next((r["accuracy"] for r in reversed(history) if r.get("kind") == "epoch"), None)
    return TrainResult(model=model, history=history, final_accuracy=acc,
                       seconds=run_seconds + (time.perf_counter() - t_epoch if not completed else 0.0),
                       steps=step, out_dir=out, completed=completed)


# ---------------------------------------------------------------- reporting
def summary_table(rows: List[Tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows)


def plot_history(history: List[dict], path: Path, title: str) -> Optional[str]:
    """Loss curves (per logged step) and test accuracy (per epoch) as one PNG; None on success, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib unavailable ({e})"
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


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Write a matplotlib figure atomically (temp file + rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()


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


def config_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


__all__ = ["Dist", "EMA", "Task", "TrainConfig", "TrainData", "TrainError", "TrainResult", "cleanup_distributed",
           "config_dict", "evaluate", "lr_at", "plot_history", "setup_distributed", "summary_table", "train"]
