"""far.reuse: TReX-style attention reuse as a method beside FAR — later encoders take an earlier
encoder's attention output through a small transformation block instead of computing attention.

Re-implemented from TReX's abstract (Moitra et al., arXiv 2408.12742; the body of the paper was not
available): which encoders reuse is chosen by a search that meets a latency budget from the IMC cost
model (far.imc.cost) at the least expected accuracy loss, and a distillation recovers accuracy.
Assumed where the abstract is silent (see far.nn.reuse and the README): the reused tensor is the
attention block's output after W_O; the transformation block is LayerNorm -> Linear(C, C) -> GELU; the
expected loss of reusing block j in block i is 1 - (cosine along tokens per channel of the two
blocks' attention outputs on calibration images), and each reusing block takes its most similar
earlier block that keeps its own attention; the search is greedy (most similar first) until the
budget is met.

    plan = search_reuse(teacher, calib_images, latency_budget_us=700)        # {block: source}
    model = far.reuse(teacher, train_set, plan=plan, eval_data=test_set)
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from far.data import iterate_batches
from far.errors import ConfigError
from far.utils.checks import finite_number
from far.evaluate import accuracy
from far.models.factory import check_input
from far.imc.cost import HardwareSpec, model_cost
from far.methods.distill import kd_loss, relative_mse
from far.models import far_modules
from far.nn import MixerTaps, apply_reuse, reuse_plan, token_mixers
from far.train import (RunReport, Task, TrainConfig, TrainResult, join_histories, run_metadata, setup_distributed,
                       stage_config, train)
from far.train.loop import check_fresh_run, check_resumable, classification_loss, limit_data


@torch.no_grad()
def attention_similarity(model: nn.Module, data, batch_size: int = 256, limit: Optional[int] = None,
                         device=None) -> torch.Tensor:
    """[L, L] mean cosine (along tokens, per channel) between blocks' attention outputs (after W_O) on
    `data` (at most `limit` images)."""
    mixers = token_mixers(model, need_proj=False)
    L = len(mixers)
    if device is None:
        device = next(model.parameters()).device
    sums = torch.zeros(L, L, dtype=torch.float64)
    count = 0
    was = model.training
    model.eval()
    try:
        with MixerTaps(model, inputs=False, pre_proj=False, outputs=True) as taps:
            for x, _ in iterate_batches(data, batch_size, device=device):
                if limit is not None and count >= limit:
                    break
                if limit is not None:  # the last batch too: at most `limit` images
                    x = x[:limit - count]
                check_input(model, x.shape, "train_data")
                model(x.to(next(model.parameters()).dtype))
                outs = [o.double() for o in taps.take()[2]]
                for i in range(L):
                    for j in range(i):
                        c = F.cosine_similarity(outs[i], outs[j], dim=1, eps=1e-12)  # [B, C]
                        sums[i, j] += c.mean(1).sum().cpu()
                count += x.shape[0]
    finally:
        model.train(was)
    if count == 0:
        raise ConfigError("attention_similarity: no calibration images")
    sim = sums / count
    return sim + sim.T + torch.eye(L, dtype=torch.float64)


def search_reuse(model: nn.Module, data, *, latency_budget_us: float, cfg=None, hw: Optional[HardwareSpec] = None,
                 limit: int = 512, similarity: Optional[torch.Tensor] = None) -> dict:
    """The reuse plan {block: source} meeting `latency_budget_us` (the cost model's latency per image) at the
    least expected accuracy loss: blocks are made reusers greedily, most similar to an earlier own-attention
    block first, skipping a pair whose source would leave too few blocks to reuse for the budget, until the
    budget is met. Returns {"plan", "latency_us", "baseline_latency_us", "met", "similarity"}; met False: no plan
    meets the budget (the plan is the search's most reuse)."""
    if not latency_budget_us > 0:
        raise ConfigError(f"latency budget must be > 0 us, got {latency_budget_us}")
    sim = similarity if similarity is not None else attention_similarity(model, data, limit=limit)
    L = len(token_mixers(model, need_proj=False))
    sim = torch.as_tensor(sim, dtype=torch.float64)
    # a smaller matrix silently kept later blocks out of the search, and a NaN pair, taken when first, was never
    # displaced (nothing compares greater than NaN)
    if sim.shape != (L, L):
        raise ConfigError(f"similarity must be [{L}, {L}] (one row and column per block), got {list(sim.shape)}")
    if not bool(torch.isfinite(sim).all()):
        raise ConfigError("similarity has NaN or inf entries (non-finite attention outputs on the calibration data?)")
    base = model_cost(model, cfg, hw).totals["latency_us"]
    plan: Dict[int, int] = {}
    latency = base
    # the fewest reusers any plan needs (a transformation block costs the same whatever its source: blocks 1..k
    # reusing block 0 is the cheapest k-reuse plan); None: no plan meets the budget
    need: Optional[int] = 0
    if latency > latency_budget_us:
        need = None
        for k in range(1, L):
            cheapest = {i: 0 for i in range(1, k + 1)}
            cost = model_cost(apply_reuse(copy.deepcopy(model), cheapest), cfg, hw)
            if cost.totals["latency_us"] <= latency_budget_us:
                need = k
                break
    while latency > latency_budget_us:
        best = None
        for i in range(1, L):
            if i in plan or any(j == i for j in plan.values()):
                continue
            for j in range(i):
                if j in plan:
                    continue
                # a pair that makes j a source leaves too few blocks to reuse (2 <- 1 first when 2 reusers are
                # needed of 3 blocks: only 1 <- 0, 2 <- 0 meets it); block 0 can be every other block's source,
                # so the most reusers still reachable are those made plus every undecided block but 0
                undecided = set(range(1, L)) - set(plan) - set(plan.values()) - {i, j}
                if need is not None and len(plan) + 1 + len(undecided) < need:
                    continue
                if best is None or sim[i, j] > best[0]:
                    best = (float(sim[i, j]), i, j)
        if best is None:
            break
        plan[best[1]] = best[2]
        latency = model_cost(apply_reuse(copy.deepcopy(model), plan), cfg, hw).totals["latency_us"]
    return {"plan": plan, "latency_us": latency, "baseline_latency_us": base, "met": latency <= latency_budget_us,
            "similarity": sim.tolist()}


class TransformTask(Task):
    """Stage 1: every reusing block's transformation block learns, from the frozen teacher's own attention
    outputs, to map the source block's output to the attention output of the block it replaces
    (relative MSE + 1 - cosine along tokens). Independent problems, clipped separately."""

    name = "reuse-transform"

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: TrainConfig):
        plan = reuse_plan(student)
        self.pairs = sorted(plan.items())
        self.transforms = nn.ModuleList([token_mixers(student, need_proj=False)[i].transform for i, _ in self.pairs])
        super().__init__(self.transforms, cfg)
        self.student = student
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        for p in self.transforms.parameters():
            p.requires_grad_(True)
        self.taps = MixerTaps(self.teacher, inputs=False, pre_proj=False, outputs=True)

    def clip_groups(self):
        return [list(t.parameters()) for t in self.transforms]

    def evaluated(self) -> nn.Module:
        return self.student.to(next(self.transforms.parameters()).device)

    def loss(self, model, x, y):
        with torch.no_grad():
            self.teacher(x)
            outs = self.taps.take()[2]
        out, total = {}, 0.0
        for k, ((i, j), tf) in enumerate(zip(self.pairs, model)):
            pred = tf(outs[j])
            mse = relative_mse(pred, outs[i])
            cos = (1.0 - F.cosine_similarity(pred.float(), outs[i].float(), dim=1, eps=1e-6)).mean()
            total = total + mse + cos
            out[f"mse_b{i}"], out[f"cos_b{i}"] = mse.detach(), cos.detach()
        out["loss"] = total
        return out

    def remove_hooks(self) -> None:
        self.taps.remove()


class FinetuneTask(Task):
    """Stage 2: every parameter, ce_weight * CE + kd_weight * KD from the teacher."""

    name = "reuse-finetune"

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: TrainConfig, ce_weight: float, kd_weight: float,
                 kd_temperature: float):
        super().__init__(student, cfg)
        self.teacher = teacher.eval()
        self.ce_weight, self.kd_weight, self.kd_temperature = ce_weight, kd_weight, kd_temperature
        for p in student.parameters():
            p.requires_grad_(True)

    def loss(self, model, x, y):
        logits = model(x)
        out, loss = {}, 0.0
        if self.ce_weight > 0:
            ce = classification_loss(logits, y, self.cfg.label_smoothing)  # soft targets under mixup
            loss, out["ce"] = loss + self.ce_weight * ce, ce.detach()
        if self.kd_weight > 0:
            with torch.no_grad():
                t = self.teacher(x)
            kd = kd_loss(logits, t, self.kd_temperature)
            loss, out["kd"] = loss + self.kd_weight * kd, kd.detach()
        out["loss"] = loss
        return out

    def remove_hooks(self) -> None:
        pass


@torch.no_grad()
def fit_transforms(student: nn.Module, teacher: nn.Module, data, limit: int = 512, ridge: float = 1e-3) -> None:
    """Initialize every transformation block's Linear by ridge regression: LN(source output) -> the replaced
    block's attention output, on teacher activations (a warm start for stage 1). `ridge` is the penalty on
    the weights relative to the mean diagonal of the Gram matrix (the bias is not penalized; 0 = the
    minimum-norm least-squares fit). Plain least squares fits held-out tokens a little better (R^2 0.61 vs
    0.55 on the zoo teacher's blocks 2 -> 3) with weights ~3000x larger (top singular value ~6e4 vs 7), which
    an 8-bit ADC cannot resolve: emulated top-1 26% vs 89% with that block on crossbars."""
    pairs = sorted(reuse_plan(student).items())
    mixers = token_mixers(student, need_proj=False)
    dev = next(teacher.parameters()).device
    xs: Dict[int, List[torch.Tensor]] = {i: [] for i, _ in pairs}
    ys: Dict[int, List[torch.Tensor]] = {i: [] for i, _ in pairs}
    count = 0
    with MixerTaps(teacher, inputs=False, pre_proj=False, outputs=True) as taps:
        for x, _ in iterate_batches(data, 256, device=dev):
            if count >= limit:
                break
            check_input(teacher, x.shape, "train_data")
            teacher(x)
            outs = taps.take()[2]
            for i, j in pairs:
                xs[i].append(mixers[i].transform.norm(outs[j]).flatten(0, 1).double())
                ys[i].append(outs[i].flatten(0, 1).double())
            count += x.shape[0]
    if ridge < 0:
        raise ConfigError(f"ridge must be >= 0, got {ridge}")
    for i, _ in pairs:
        a, b = torch.cat(xs[i]).cpu(), torch.cat(ys[i]).cpu()
        a1 = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
        # LN rows sum to 0 (to sum(bias/weight) with an affine): [LN(x), 1] has dependent columns; the ridge (or,
        # without it, the minimum-norm SVD solution) and center_ keep the weights small
        if ridge > 0:
            gram = a1.T @ a1
            penalty = torch.eye(len(gram), dtype=gram.dtype) * ridge * torch.diagonal(gram)[:-1].mean()
            penalty[-1, -1] = 0
            sol = torch.linalg.solve(gram + penalty, a1.T @ b)  # [C + 1, C]
        else:
            sol = torch.linalg.lstsq(a1, b, driver="gelsd").solution
        transform = mixers[i].transform
        lin = transform.linear
        lin.weight.copy_(sol[:-1].T.to(lin.weight.dtype))
        lin.bias.copy_(sol[-1].to(lin.bias.dtype))
        transform.center_()


def _unmet_budget(teacher: nn.Module, search: dict, budget_us: float, cfg, hw) -> str:
    """Why search_reuse's plan misses `budget_us`: the search's most reuse and the least latency any plan reaches
    (latency is a sum over layers and a transformation block costs the same whatever its source, so that is every
    later block reusing block 0)."""
    every = {i: 0 for i in range(1, len(search["similarity"]))}
    least = min(search["latency_us"], search["baseline_latency_us"],
                model_cost(apply_reuse(copy.deepcopy(teacher), every), cfg, hw).totals["latency_us"])
    found = ", ".join(f"{i} <- {j}" for i, j in sorted(search["plan"].items())) or "none"
    text = (f"the latency budget {_us(budget_us)} cannot be met: the search's most reuse (blocks {found}) "
            f"reaches {_us(search['latency_us'])} (teacher {_us(search['baseline_latency_us'])}); ")
    if least <= budget_us:  # the greedy search stopped short of a plan that meets it
        return text + (f"the plan of every later block reusing block 0 reaches {_us(least)}: give it "
                       f"(--plan {','.join(f'{i}:0' for i in every)})")
    return text + f"the smallest latency reachable by reuse is {_us(least)}"


def _us(us: float) -> str:
    return f"{us:.1f} us"


def reuse(teacher: nn.Module, train_data, *, plan: Optional[Dict[int, int]] = None,
          latency_budget_us: Optional[float] = None, eval_data=None, config: Optional[TrainConfig] = None,
          stage2_epochs: float = 1.0, stage2_lr: float = 2e-4, ce_weight: float = 1.0, kd_weight: float = 1.0,
          kd_temperature: float = 2.0, transform: str = "ln-linear-gelu", cost_config=None,
          hardware: Optional[HardwareSpec] = None, device: Optional[str] = None, ridge: float = 1e-3,
          identity: Optional[dict] = None) -> nn.Module:
    """A TReX-style copy of the attention model `teacher`: blocks of `plan` ({block: source}), or of the plan
    search_reuse picks for `latency_budget_us`, reuse an earlier block's attention output. Stage 1
    (config.epochs; 0 skips it) trains the transformation blocks on the teacher's activations (after a
    ridge-regression warm start, fit_transforms); stage 2 (stage2_epochs at stage2_lr) fine-tunes everything with CE + KD. The
    transformation blocks' weights are then centred (Transform.center_: same function, no component that
    cancels only in exact arithmetic).
    A budget the search does not meet is a ConfigError before any training, with the least latency reuse
    reaches. Returns the model (eval mode) with `far_metadata` and `far_run` (see far.distill); the search's
    record is in far_metadata["reuse"]."""
    cfg = config or TrainConfig()
    if cfg.epochs < 0:  # before validate, whose "epochs must be > 0" would hide that 0 skips stage 1
        raise ConfigError(f"stage 1 epochs must be >= 0 (0 = the least-squares start only), got {cfg.epochs}")
    dataclasses.replace(cfg, epochs=cfg.epochs or 1.0).validate()
    if (plan is None) == (latency_budget_us is None):
        raise ConfigError("give exactly one of plan= and latency_budget_us=")
    for name, v in (("stage2_epochs", stage2_epochs), ("stage2_lr", stage2_lr), ("ce_weight", ce_weight),
                    ("kd_weight", kd_weight), ("ridge", ridge)):
        finite_number(name, v, low=0)
    finite_number("kd_temperature", kd_temperature, low=0, strict=True)
    if latency_budget_us is not None:
        finite_number("latency_budget_us", latency_budget_us, low=0, strict=True)
    if plan is not None and (not isinstance(plan, dict) or not plan):
        raise ConfigError(f"plan must be a non-empty {{block: source block}} dict, got {plan!r}")
    if stage2_epochs > 0 and ce_weight + kd_weight == 0:
        raise ConfigError("stage 2 needs a loss: ce_weight and kd_weight are both 0 (give one > 0, or stage2_epochs=0)")
    check_fresh_run(cfg)  # both stages' folders, before stage 1 could overwrite its own
    check_resumable(cfg)  # a --resume with nothing to resume would start every stage over
    train_data, eval_data = limit_data(cfg, train_data, eval_data)
    if far_modules(teacher) or reuse_plan(teacher):
        raise ConfigError("the teacher must be a plain attention model (no FAR blocks, no reuse)")
    d = setup_distributed(device)
    teacher = copy.deepcopy(teacher).to(d.device).eval()
    search = None
    if plan is None:
        search = search_reuse(teacher, train_data, latency_budget_us=latency_budget_us, cfg=cost_config, hw=hardware)
        plan = search["plan"]
        if not search["met"]:
            raise ConfigError(_unmet_budget(teacher, search, latency_budget_us, cost_config, hardware))
        if not plan:
            raise ConfigError(f"the teacher already meets the latency budget ({search['baseline_latency_us']:.1f} us "
                              f"<= {latency_budget_us} us): nothing to reuse")
    torch.manual_seed(cfg.seed)
    student = apply_reuse(copy.deepcopy(teacher), plan, kind=transform)
    fit_transforms(student, teacher, train_data, ridge=ridge)
    results: List[TrainResult] = []
    ident = {**(identity or {}), "plan": plan, "transform": transform, "ridge": ridge}
    if cfg.epochs > 0:
        c1 = stage_config(cfg, "stage1")
        task = TransformTask(student, teacher, c1)
        try:
            results.append(train(task, train_data, eval_data, c1, d, identity=ident,
                                 desc="reuse stage 1"))
        finally:
            task.remove_hooks()
    if stage2_epochs > 0 and (not results or results[-1].completed):
        c2 = stage_config(cfg, "stage2", epochs=stage2_epochs, lr=stage2_lr, min_lr=min(cfg.min_lr, stage2_lr),
                          warmup_epochs=min(cfg.warmup_epochs, stage2_epochs / 4))
        task = FinetuneTask(student, teacher, c2, ce_weight, kd_weight, kd_temperature)
        results.append(train(task, train_data, eval_data, c2, d, identity={
            **ident, "stage": 2, "ce_weight": ce_weight, "kd_weight": kd_weight, "kd_temperature": kd_temperature},
            desc="reuse stage 2"))
    for i in plan:  # training can drift along the LayerNorm's null direction too: taken out, function unchanged
        student.blocks[i].attn.transform.center_()
    ok = all(r.completed for r in results)
    acc = results[-1].final_accuracy if results else accuracy(student, eval_data, device=d.device)
    t_acc = accuracy(teacher, eval_data, batch_size=cfg.eval_batch_size, device=d.device)
    done = TrainResult(student, join_histories(*[r.history for r in results]), acc, sum(r.seconds for r in results),
                       sum(r.steps for r in results), None, ok)
    cost = model_cost(student, cost_config, hardware).totals
    record = {"plan": {str(i): j for i, j in sorted(plan.items())}, "transform": transform, "ridge": ridge,
              "latency_us": cost["latency_us"], "search": None if search is None else
              {k: search[k] for k in ("latency_us", "baseline_latency_us", "met")} | {"budget_us": latency_budget_us}}
    student.far_metadata = run_metadata("reuse", cfg, d, done, teacher_test_accuracy=t_acc, reuse=record,
                                        **(identity or {}))
    student.far_run = RunReport("reuse", done.history, acc, done.seconds, done.steps, ok, cfg.out_dir, rows=[
        ("teacher top-1", f"{100 * t_acc:.2f}%" if t_acc is not None else "n/a"),
        ("reusing blocks", ", ".join(f"{i} <- {j}" for i, j in sorted(plan.items()))),
        ("latency per image (cost model)", f"{cost['latency_us']:.1f} us" + (
            f" (teacher {search['baseline_latency_us']:.1f} us, budget {latency_budget_us} us)" if search else "")),
        ("parameters", f"{sum(p.numel() for p in student.parameters()):,}")])
    for p in student.parameters():
        p.requires_grad_(True)
    return student.eval()


__all__ = ["attention_similarity", "fit_transforms", "reuse", "search_reuse"]
