"""Polish: a second-order finish for block-wise distillation (far.distill(polish_iters=...), `far distill
--polish-iters`).

After stage 1 each FAR block is a small regression problem of its own: its teacher block's inputs in, the
attention's output before W_O out. Adam's last epochs creep along it (block 2 of the zoo's teacher: 8 epochs 0.935,
16 epochs 0.938 isolated cosine), so `polish_block` runs full-batch L-BFGS (strong-Wolfe line search) on that
problem, with the teacher's block inputs and targets for `images` training images cached once per block (the
stage-1 blocks stay independent: the same cached problem whichever other blocks exist). The objective is the run's
block loss on the whole cache at once, exactly block_loss(FAR(all inputs), all targets): "cos" is the mean over
(image, channel) of 1 - cosine along the tokens, "mse" the relative squared error over everything.

Memory: a block's cache holds 2 x images x tokens x channels floats (10,000 Fashion-MNIST images of
fmnist_deit_tiny: 384 MB), one block at a time, on the training device. Under torchrun each process polishes
its share of the blocks (block j on rank j mod world) on the same images, then every block's parameters are
broadcast from the process that polished it: the result does not depend on the number of processes.

What it buys is measured in the README ("A second-order polish").
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from far.data import first, iterate_batches
from far.errors import ConfigError
from far.methods.recipes import POLISH_IMAGES
from far.nn import FARAttention, MixerTaps, token_mixers

HISTORY_SIZE = 50  # L-BFGS curvature pairs kept (66k parameters per block of the zoo: 13 MB)


def check_polish(iters, images) -> None:
    """ConfigError unless iters is an int >= 0 and images an int >= 1."""
    for name, v, low in (("polish iters", iters, 0), ("polish images", images, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"{name} must be an int >= {low}, got {v!r}")


def full_batch_loss(mix: FARAttention, inputs: torch.Tensor, targets: torch.Tensor, kind: str, chunk: int,
                    backward: bool = False) -> Dict[str, float]:
    """{"cos": ..., "mse": ...} (the terms of `kind`) and "loss" (their sum) of block `mix` on all of `inputs`
    [M, N, C] against `targets`, taken `chunk` images at a time; the same values as block_loss on the whole
    set at once. backward=True accumulates the gradient of "loss" into the parameters' .grad."""
    if kind not in ("cos", "mse", "cos+mse"):
        raise ConfigError(f"block loss must be one of cos, mse, cos+mse, got {kind!r}")
    m, channels = inputs.shape[0], targets.shape[2]
    wide = torch.promote_types(targets.dtype, torch.float32)
    t_sq = float(targets.to(wide).square().sum()) if "mse" in kind else 0.0
    sums = {k: 0.0 for k in ("cos", "mse") if k in kind}
    for i in range(0, m, chunk):
        with torch.set_grad_enabled(backward):
            s = mix.token_mix(inputs[i:i + chunk]).to(wide)
            t = targets[i:i + chunk].to(wide)
            terms = {}
            if "cos" in sums:
                terms["cos"] = (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-6)).sum() / (m * channels)
            if "mse" in sums:
                terms["mse"] = (s - t).square().sum() / max(t_sq, 1e-12)
            if backward:
                sum(terms.values()).backward()
        for k, v in terms.items():
            sums[k] += float(v.detach())
    sums["loss"] = sum(sums.values())
    return sums


def polish_block(mix: FARAttention, inputs: torch.Tensor, targets: torch.Tensor, iters: int, kind: str = "cos+mse",
                 chunk: int = 500, params: Optional[Sequence[nn.Parameter]] = None,
                 on_eval: Optional[Callable[[float], None]] = None, every: Optional[int] = None,
                 on_round: Optional[Callable[[int, float], None]] = None) -> dict:
    """Full-batch L-BFGS on one FAR block: at most `iters` iterations (and 1.25 x iters evaluations, torch's
    default; a line search may take several) on full_batch_loss(mix, inputs, targets, kind) over `params`
    (default: every parameter of the block but proj, W_O, which the target is taken before).
    Keeps the new weights only when they lower the loss and it is finite (else the block is put back as it
    was). Units a pruned block keeps at zero stay exactly zero (their gradient is zero, and so is every L-BFGS
    direction there). on_eval(loss) follows every evaluation (line-search trials included); with `every`, the
    iterations run in rounds of that many (one optimizer, its curvature pairs kept: the same path but one
    evaluation more per round) and on_round(iterations so far, loss) follows each. Stops early where L-BFGS
    converges. Returns {"loss_start", "loss", "terms", "evals", "iters", "kept"}."""
    if params is None:
        params = [p for name, p in mix.named_parameters() if not name.startswith("proj.")]
    params = list(params)
    if not params:
        raise ConfigError("polish: the block has no parameters to train")
    flags = {p: p.requires_grad for p in mix.parameters()}
    for p in mix.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    saved = [p.detach().clone() for p in params]
    evals = 0
    try:
        start = full_batch_loss(mix, inputs, targets, kind, chunk)
        if iters == 0 or not math.isfinite(start["loss"]):
            return {"loss_start": start["loss"], "loss": start["loss"], "terms": start, "evals": 0, "iters": 0,
                    "kept": False}
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=iters, history_size=HISTORY_SIZE,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)
        last = start["loss"]

        def closure() -> torch.Tensor:
            nonlocal evals, last
            opt.zero_grad(set_to_none=False)
            last = full_batch_loss(mix, inputs, targets, kind, chunk, backward=True)["loss"]
            evals += 1
            if on_eval is not None:
                on_eval(last)
            return torch.tensor(last, dtype=torch.float64)

        # evaluations: torch's default for one run of `iters`, over all rounds; a later round's first evaluation
        # (at the point the round before ended on) is not counted
        done, budget, repeats = 0, iters * 5 // 4, 0
        while done < iters and evals - repeats < budget:
            size = min(every or iters, iters - done)
            repeats += 1 if done else 0
            opt.param_groups[0].update(max_iter=size, max_eval=budget - (evals - repeats))
            opt.step(closure)
            now = int(opt.state[params[0]].get("n_iter", done))
            if now == done:  # converged: a further round would not move
                break
            done = now
            if on_round is not None:
                on_round(done, last)
        end = full_batch_loss(mix, inputs, targets, kind, chunk)
        kept = math.isfinite(end["loss"]) and end["loss"] <= start["loss"]
        if not kept:
            with torch.no_grad():
                for p, v in zip(params, saved):
                    p.copy_(v)
            end = start
        return {"loss_start": start["loss"], "loss": end["loss"], "terms": end, "evals": evals, "iters": done,
                "kept": kept}
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
            p.grad = None


def _bar_step(bar) -> Callable[[float], None]:
    def step(value: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{value:.5f}")
    return step


def block_problem(teacher: nn.Module, data, block: int, images: int, batch_size: int, device,
                  dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """The cached problem of one block: the teacher's block inputs (normed, as its attention reads them) and its
    attention outputs before W_O for the first `images` items of `data`, [M, N, C] each, on `device`."""
    xs: List[torch.Tensor] = []
    ys: List[torch.Tensor] = []
    t_dtype = next(teacher.parameters()).dtype
    with torch.no_grad(), MixerTaps(teacher) as taps:
        for x, _ in iterate_batches(first(data, images), batch_size, device=device):
            teacher(x.to(t_dtype))
            i, o = taps.take()
            xs.append(i[block].to(dtype))
            ys.append(o[block].to(dtype))
    if not xs:
        raise ConfigError("polish: the training data is empty")
    return torch.cat(xs), torch.cat(ys)


def polish_blocks(student: nn.Module, teacher: nn.Module, data, *, iters: int, images: int = POLISH_IMAGES,
                  kind: str = "cos+mse", batch_size: int = 500, device=None, rank: int = 0, world: int = 1,
                  broadcast: Optional[Callable[[torch.Tensor, int], None]] = None, seed: int = 0,
                  progress: bool = False, owned: Callable[[str], bool] = lambda name: not name.startswith("proj.")
                  ) -> List[dict]:
    """polish_block on every FAR block of `student` against `teacher` (both on `device`, teacher frozen), each on
    its teacher block's problem for the first `images` items of `data` (block_problem; the data's random
    augmentation seeded with `seed`). Block j of the FAR blocks is polished by process j mod `world`;
    `broadcast(tensor, src)` then shares its parameters (required when world > 1). Returns one row per block:
    {"kind": "polish", "block", "loss_start", "loss", "evals", "kept", "seconds"} (the rows of other processes'
    blocks without losses)."""
    check_polish(iters, images)
    if world > 1 and broadcast is None:
        raise ConfigError("polish: several processes need a broadcast")
    mixers = token_mixers(student)
    far_idx = [i for i, m in enumerate(mixers) if isinstance(m, FARAttention)]
    if not far_idx:
        raise ConfigError("polish needs a student with FAR blocks")
    dtype = next(student.parameters()).dtype
    rows = []
    for j, b in enumerate(far_idx):
        mix = mixers[b]
        row = {"kind": "polish", "block": b}
        if j % world == rank:
            t0 = time.perf_counter()
            torch.manual_seed(seed + b)  # the cached augmentation: the same whatever the process count
            inputs, targets = block_problem(teacher, data, b, images, batch_size, device, dtype)
            bar = None
            if progress:
                from tqdm import tqdm

                mb = 2 * inputs.numel() * inputs.element_size() / 2**20
                bar = tqdm(total=iters * 5 // 4, unit="eval", file=sys.stderr, dynamic_ncols=True, leave=False,
                           desc=f"polish block {b} ({inputs.shape[0]} images, {mb:.0f} MB)")
            try:
                params = [p for name, p in mix.named_parameters() if owned(name)]
                r = polish_block(mix, inputs, targets, iters, kind, chunk=batch_size, params=params,
                                 on_eval=None if bar is None else _bar_step(bar))
            finally:
                if bar is not None:
                    bar.close()
            del inputs, targets
            row.update(loss_start=r["loss_start"], loss=r["loss"], evals=r["evals"], kept=r["kept"],
                       seconds=round(time.perf_counter() - t0, 3))
        rows.append(row)
    if world > 1:
        for j, b in enumerate(far_idx):
            for p in mixers[b].parameters():
                broadcast(p.data, j % world)
    return rows
