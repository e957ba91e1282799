"""far.evaluate: top-1 accuracy and throughput of a model on a dataset — the one evaluation loop
(the eval and imc-eval commands, the demo and the training loop's per-epoch test all use it)."""
from __future__ import annotations

import contextlib
import sys
import time
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from far_kernels.benchmark import Stopwatch
from far.data import iterate_batches, num_batches, shard
from far.errors import ConfigError, DataError
from far.models import check_input
from far.models.factory import top1
from far.utils.env import check_on_device, eval_mode, model_device, param_dtype


def evaluate(model: nn.Module, data, *, batch_size: int = 256, device=None, workers: int = 0,
             progress: bool = False, desc: str = "eval", keep_logits: bool = False) -> dict:
    """Top-1 accuracy of `model` on `data` under torch.inference_mode, in eval mode (every module's own mode
    is restored afterwards), with its speed.

    Args:
        model: any classifier x [B, C, H, W] -> logits [B, K]; inputs are cast to its parameter dtype.
        data: a dataset of (image, label) (far.data's Fashion-MNIST takes a batched fast path).
        device: where the batches go (default: the model's device).
        workers: DataLoader workers for generic datasets.
        progress: a tqdm bar on stderr with the running accuracy.
        keep_logits: also return every logit ("logits", [N, K] on the CPU, in data order; under
            torch.distributed gathered from every process, on every process).
    Under torch.distributed (initialized, world > 1) every process takes a strided share and the
    counts are summed; speeds are per process.
    Returns {"num_images", "correct", "accuracy", "images_per_s" (model time, first batch excluded as
    warm-up unless it is the only one; CUDA synchronized), "end_to_end_images_per_s", "batches",
    "seconds", "warmup_excluded", "nonfinite" (images whose logits hold NaN/inf: counted as errors, with a
    warning)[, "logits"]}."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if getattr(model, "num_classes", None) == 0:  # its "logits" are pooled features
        raise ConfigError("the model has no classifier (num_classes 0): there is no top-1 to measure; compare "
                          "features with far.analyze / far.fidelity, or give it a head (far finetune)")
    device = model_device(model, device)
    check_on_device(model, device)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world > 1:
        data = shard(data, dist.get_rank(), world)
    dtype = param_dtype(model)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    bad_labels = torch.zeros((), dtype=torch.int64, device=device)  # outside [0, classes): checked once, at the end
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # images with a NaN/inf logit: counted wrong
    seen, timed_images, e2e_images = 0, 0, 0
    model_time = Stopwatch(device)
    logits_all = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(data), unit="img", desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)
    modes = contextlib.ExitStack()
    modes.enter_context(eval_mode(model))
    classes = getattr(model, "num_classes", None)  # the logits' width once a batch has run (this process may have none)
    t_all = time.perf_counter()
    e2e_start = None
    try:
        with torch.inference_mode():
            for i, (x, y) in enumerate(iterate_batches(data, batch_size, device=device, num_workers=workers)):
                if i == 0:  # images that do not fit a ViT: a clear error, not timm's assertion deep inside
                    check_input(model, x.shape, "the data")
                x = x.to(dtype)
                warm = model_time.seconds
                with model_time:
                    logits = model(x)
                    pred = top1(logits)
                    correct += (pred == y).sum()
                    nonfinite += (pred < 0).sum()
                    classes = logits.shape[-1]
                    bad_labels += ((y < 0) | (y >= classes)).sum()
                if i == 0:  # warm-up: not timed
                    model_time.seconds = warm
                    e2e_start = time.perf_counter()
                else:
                    timed_images += x.shape[0]
                    e2e_images += x.shape[0]
                seen += x.shape[0]
                if keep_logits:
                    logits_all.append(logits.float().cpu())
                if bar is not None:
                    bar.update(x.shape[0])
                    bar.set_postfix(acc=f"{100.0 * int(correct) / seen:.2f}%", refresh=False)
    finally:
        if bar is not None:
            bar.close()
        modes.close()
    t_end = time.perf_counter()
    # bad labels are summed over the processes too: every rank raises, none waits for the others in a collective
    total = torch.tensor([int(correct), seen, int(nonfinite), int(bad_labels)], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    n_correct, n_seen, n_nonfinite, n_bad = (int(v) for v in total.tolist())
    if n_seen == 0:
        raise DataError("the dataset is empty")
    if n_bad:
        raise DataError(f"{n_bad} label(s) outside the model's "
                        + (f"{classes} classes [0, {classes - 1}]" if isinstance(classes, int) else "classes")
                        + ": top-1 would count them as errors")
    if n_nonfinite:
        warnings.warn(f"{n_nonfinite} of {n_seen} images gave non-finite (NaN/inf) logits: counted as errors "
                      "(a diverged or overflowing model? try float32)", stacklevel=2)
    if timed_images == 0:  # one batch only: nothing left after warm-up, report it (warm-up included)
        ips = e2e_ips = seen / max(t_end - t_all, 1e-9)
    else:
        ips = timed_images / max(model_time.seconds, 1e-9)
        e2e_ips = e2e_images / max(t_end - e2e_start, 1e-9)
    res = {"num_images": n_seen, "correct": n_correct, "accuracy": n_correct / n_seen, "images_per_s": ips,
           "end_to_end_images_per_s": e2e_ips, "batches": num_batches(data, batch_size), "seconds": t_end - t_all,
           "warmup_excluded": timed_images > 0, "nonfinite": n_nonfinite}
    if keep_logits:
        mine = torch.cat(logits_all) if logits_all else torch.zeros(0, classes or 0)
        res["logits"] = _gathered(mine, n_seen, world) if world > 1 else mine
    return res


def _gathered(mine: torch.Tensor, n: int, world: int) -> torch.Tensor:
    """Every process's logits of its strided share (far.data.shard: items rank, rank + world, ...) put back
    in data order, on every process."""
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    width = next((p.shape[-1] for p in parts if p.numel()), mine.shape[-1])
    out = torch.zeros(n, width)
    for r, p in enumerate(parts):
        out[r::world] = p
    return out


def accuracy(model: nn.Module, data, *, batch_size: int = 500, device=None) -> Optional[float]:
    """Top-1 accuracy only (None for no data): the training loop's per-epoch test."""
    if data is None:
        return None
    return evaluate(model, data, batch_size=batch_size, device=device)["accuracy"]


def predict(model: nn.Module, data, *, batch_size: int = 256, device=None, workers: int = 0, top_k: int = 1,
            progress: bool = False) -> dict:
    """The `top_k` classes of every image of `data` (a dataset of (image, anything); far.data.image_files makes one
    from paths) under torch.inference_mode, in eval mode (restored afterwards), in data order.

    Returns {"classes": LongTensor [N, k], "probs": float32 [N, k] (softmax of the logits, computed in float32),
    "num_images", "images_per_s" (end to end)}. Images whose logits are not finite get class -1 and probability
    NaN, with a warning. The batches go to `device` (default: the model's), where the model must be."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    num_classes = getattr(model, "num_classes", None)
    if num_classes == 0:
        raise ConfigError("the model has no classifier (num_classes 0): there are no classes to predict")
    if top_k < 1 or (num_classes is not None and top_k > num_classes):
        raise ConfigError(f"top_k must be in [1, {num_classes or 'classes'}], got {top_k}")
    device = model_device(model, device)
    check_on_device(model, device)
    dtype = param_dtype(model)
    classes, probs, bad = [], [], 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(data), desc="predict", unit="img", file=sys.stderr)
    t0 = time.perf_counter()
    with eval_mode(model), torch.inference_mode():
        for x, _ in iterate_batches(data, batch_size, device=device, num_workers=workers):
            logits = model(x.to(dtype)).float()
            p = torch.softmax(logits, dim=1)
            v, i = p.topk(top_k, dim=1)
            finite = torch.isfinite(logits).all(dim=1)
            bad += int((~finite).sum())
            i = torch.where(finite[:, None], i, torch.full_like(i, -1))
            v = torch.where(finite[:, None], v, torch.full_like(v, float("nan")))
            classes.append(i.cpu())
            probs.append(v.cpu())
            if bar is not None:
                bar.update(x.shape[0])
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    if bad:
        warnings.warn(f"{bad} image(s) gave non-finite logits: class -1, probability NaN", stacklevel=2)
    n = sum(c.shape[0] for c in classes)
    return {"classes": torch.cat(classes) if classes else torch.zeros(0, top_k, dtype=torch.long),
            "probs": torch.cat(probs) if probs else torch.zeros(0, top_k), "num_images": n,
            "images_per_s": n / seconds if seconds > 0 else float("inf")}
