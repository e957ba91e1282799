"""far.fidelity: does each FAR block reproduce the attention block it replaced?

For every block b, with t the teacher attention's output before W_O (the input of its proj) and s the
FAR block's output before proj (FARAttention.token_mix):
  isolated   s = the student's FAR block fed the teacher's own block input (the block as a function)
  in_model   s = the FAR block's output in the student's own forward pass (errors of earlier blocks
             included: what the model really computes)
and for each, over every image of the data:
  cos        cosine along the token axis, per (image, channel): the distillation objective of FAR
  token_cos  cosine along the channel axis, per (image, token)
  rel_mse    sum (s - t)^2 / sum t^2 (0 = equal; sees magnitude, unlike the cosines)
  scale      ||s|| / ||t|| over all entries (1 = same magnitude)
  head_cos   cos of each attention head's channels alone (a list, one per head): which head a block misses
plus top-1 agreement of student and teacher and both accuracies.

    report = block_fidelity(teacher, student, test_set)
    [b["isolated"]["cos"] for b in report["blocks"]]
"""
from __future__ import annotations

import contextlib
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from far.data import iterate_batches
from far.errors import ConfigError, DataError
from far.models.factory import check_input, check_labels, top1
from far.nn import FARAttention, MixerTaps, token_mixers
from far.utils.env import check_on_device, eval_mode, model_device, param_dtype

KINDS = ("isolated", "in_model")


class BlockStats:
    """Running sums of one block's statistics (cos, token_cos, rel_mse, scale, head_cos of the module
    docstring): `add(s, t)` for every batch of outputs [B, N, C], then `result()`. The C channels are `heads`
    equal groups (attention's head layout); head_cos is cos over each group's channels."""

    def __init__(self, heads: int = 1):
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ConfigError(f"heads must be a positive int, got {heads!r}")
        self.heads = heads
        self.tcos = self.n_tcos = 0.0
        self.err = self.ref = self.own = 0.0
        self.images = 0
        self.head_cos = torch.zeros(heads, dtype=torch.float64)  # summed over images; cos is their mean

    @torch.no_grad()
    def add(self, s: torch.Tensor, t: torch.Tensor) -> None:
        if s.shape != t.shape or s.dim() != 3 or s.shape[2] % self.heads:
            raise ConfigError(f"block outputs must be [B, N, C] of one shape with C a multiple of {self.heads} "
                              f"heads, got {list(s.shape)} and {list(t.shape)}")
        s, t = s.double(), t.double()
        c = F.cosine_similarity(s, t, dim=1, eps=1e-12)  # [B, C]: along tokens
        self.head_cos += c.reshape(c.shape[0], self.heads, -1).mean(2).sum(0).cpu()
        self.images += c.shape[0]
        tc = F.cosine_similarity(s, t, dim=2, eps=1e-12)  # [B, N]: along channels
        self.tcos += float(tc.sum())
        self.n_tcos += tc.numel()
        self.err += float((s - t).square().sum())
        self.ref += float(t.square().sum())
        self.own += float(s.square().sum())

    def result(self) -> dict:
        head_cos = self.head_cos / max(self.images, 1)  # every head has C / heads channels: cos is their mean
        return {"cos": float(head_cos.mean()), "token_cos": self.tcos / max(self.n_tcos, 1),
                "rel_mse": self.err / max(self.ref, 1e-300), "scale": (self.own / max(self.ref, 1e-300)) ** 0.5,
                "head_cos": head_cos.tolist()}


@torch.no_grad()
def block_fidelity(teacher: nn.Module, student: nn.Module, data, *, batch_size: int = 256, device=None,
                   progress: bool = False) -> dict:
    """Per-block fidelity of `student` (FAR) to `teacher` (attention) on `data` (see the module docstring).

    Both models run in eval mode (restored afterwards) where they are: the batches go to `device` (default: the
    student's), where both models must already be (ConfigError otherwise; nothing is moved). Returns
    {"num_images", "agreement", "teacher_accuracy", "student_accuracy", "blocks": [{"block", "far",
    "isolated": {...} or None (a block that is not FAR), "in_model": {...}}], "mean": {kind: {metric}}}: "mean"
    averages the FAR blocks for both kinds (in a partial student the attention blocks, whose in-model cosine
    is 1 up to the FAR blocks' drift, would lift "in_model" above "isolated"); every block's in_model, and an
    isolated None, for a student without FAR blocks."""
    t_mix, s_mix = token_mixers(teacher), token_mixers(student)
    if len(t_mix) != len(s_mix):
        raise ConfigError(f"teacher and student have {len(t_mix)} and {len(s_mix)} blocks")
    device = model_device(student, device)
    for name, m in (("teacher", teacher), ("student", student)):
        check_on_device(m, device, f"the {name}")
    t_dtype, s_dtype = param_dtype(teacher), param_dtype(student)  # each model gets the images in its own dtype
    sums = [{k: BlockStats(getattr(m, "num_heads", 1)) for k in KINDS} for m in t_mix]
    agree = t_correct = s_correct = seen = labelled = t_nonfinite = s_nonfinite = 0
    modes = contextlib.ExitStack()
    modes.enter_context(eval_mode(teacher, student))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(data), unit="img", desc="fidelity", file=sys.stderr, dynamic_ncols=True, leave=False)
    try:
        with MixerTaps(teacher) as t_taps, MixerTaps(student, inputs=False) as s_taps:
            for x, y in iterate_batches(data, batch_size, device=device):
                check_input(teacher, x.shape, "the data")
                check_labels(teacher, y, "the data")
                t_logits = teacher(x.to(t_dtype))
                t_in, t_out = t_taps.take()
                s_logits = student(x.to(s_dtype))
                _, s_out = s_taps.take()
                for b, (mix, a, t, s) in enumerate(zip(s_mix, t_in, t_out, s_out)):
                    if isinstance(mix, FARAttention):
                        sums[b]["isolated"].add(mix.token_mix(a.to(s_dtype)), t)
                    sums[b]["in_model"].add(s, t)
                tp, sp = top1(t_logits), top1(s_logits)  # -1 for a NaN/inf row: agrees with nothing
                agree += int(((tp == sp) & (sp >= 0)).sum())
                t_nonfinite += int((tp < 0).sum())
                s_nonfinite += int((sp < 0).sum())
                valid = y >= 0
                labelled += int(valid.sum())
                t_correct += int((tp == y)[valid].sum())
                s_correct += int((sp == y)[valid].sum())
                seen += x.shape[0]
                if bar is not None:
                    bar.update(x.shape[0])
    finally:
        if bar is not None:
            bar.close()
        modes.close()
    if seen == 0:
        raise DataError("the dataset is empty")
    warn_nonfinite({"teacher": t_nonfinite, "student": s_nonfinite}, seen)
    blocks = []
    for b, mix in enumerate(s_mix):
        far = isinstance(mix, FARAttention)
        blocks.append({"block": b, "far": far, "isolated": sums[b]["isolated"].result() if far else None,
                       "in_model": sums[b]["in_model"].result()})
    over = [blk for blk in blocks if blk["far"]] or blocks  # both kinds over the same blocks (see the docstring)
    mean = {}
    for kind in KINDS:
        rows = [blk[kind] for blk in over if blk[kind] is not None]
        mean[kind] = {m: sum(r[m] for r in rows) / len(rows) for m in rows[0] if m != "head_cos"} if rows else None
    return {"num_images": seen, "agreement": agree / seen,
            "teacher_accuracy": t_correct / labelled if labelled else None,
            "student_accuracy": s_correct / labelled if labelled else None, "blocks": blocks, "mean": mean,
            "nonfinite": {"teacher": t_nonfinite, "student": s_nonfinite}}


def warn_nonfinite(counts: dict, seen: int) -> None:
    """A warning naming each model whose logits held NaN/inf on some images (counted as wrong and as agreeing
    with nothing, as far.evaluate counts them)."""
    bad = {k: v for k, v in counts.items() if v}
    if bad:
        warnings.warn(", ".join(f"{k}: {v} of {seen}" for k, v in bad.items()) + " images gave non-finite (NaN/inf) "
                      "logits: counted as wrong and as agreeing with nothing", stacklevel=3)


def head_cos_line(report: dict) -> str:
    """'isolated cos per head (...): block 0 0.944 0.960 0.968 | block 1 ...' (in-model where a block is not FAR):
    whether a block misses its attention in one head or in all of them."""
    cells = []
    for blk in report["blocks"]:
        r = blk["isolated"] or blk["in_model"]
        mark = "" if blk["isolated"] else " (in model)"
        cells.append(f"block {blk['block']}{mark} " + " ".join(f"{c:.3f}" for c in r.get("head_cos", [])))
    return "isolated cos per head (tokens, over each head's channels): " + " | ".join(cells)
