"""far.analysis: how faithfully a FAR student reproduces its attention teacher, block by block and over
depth, and how its token interactions compare with the attention maps (`far analyze`).

Definitions (all on held-out images; "block output" is a token mixer's output before its projection W_O,
the input of `proj`, as in distillation and far.fidelity):
  1. per block, on the teacher's own block input (far.fidelity.block_fidelity, "isolated"): cosine along
     tokens per channel ("cos", the paper's; mean over channels and images), cosine along channels per
     token ("token_cos"; mean over tokens and images), relative MSE sum (s - t)^2 / sum t^2 and the scale
     ||s|| / ||t||, "cos" over each head's channels alone ("head_cos", one per head); the same in the
     student's own forward pass ("in_model", earlier errors included).
  2. partial replacement, k = 0..L-1: the teacher with blocks 0..k replaced by the student's, the rest
     attention, in two readings: part "mixer" swaps only the token mixers (attention -> FAR block, the
     teacher's norms, MLPs and head kept); part "block" swaps whole transformer blocks (the student's
     MLPs and norms too, which stage 2 of distillation retrains). Per k: the cosine of the final features
     (pre-logits: the classifier's input, per image, mean over images) with the teacher's, the top-1
     agreement of the logits with the teacher's, and the accuracy when labels exist.
  3. the full student: final-feature cosine, top-1 agreement, accuracy.
  4. token maps for the first `map_images` images, per block and head, on the teacher's block input x:
       A[h][i, j]    the attention probabilities softmax(q_i . k_j * scale) of the teacher's head h;
       J[h][i, j]    ||d o_{i,h} / d x_j||_F: o_{i,h} = head h's d channels of the block output at token i
                     (for FAR: head_proj of head h; for attention: head h's A V), x_j = the block input at
                     token j (all C channels); each row divided by its sum (rows sum to 1, like A).
     Maps of the images are averaged (A as is, J after row normalisation), then compared per (block,
     head): "row_cos" = mean over rows i of the cosine between row i of the two maps, "pearson" = the
     Pearson correlation of the flattened T x T maps. Pairs: attention A vs the FAR Jacobian
     ("attn_vs_far"), A vs the attention's own Jacobian ("attn_vs_attn_jacobian", the reference: how
     far a Jacobian is from A even for attention) and the two Jacobians ("attn_jacobian_vs_far").
     Every token counts, the class token included.

    report = analyze(teacher, student, test_set)
    print(format_analysis(report)); plot_analysis(report, "out")
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterable, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from far.data import iterate_batches
from far.errors import ConfigError, DataError
from far.fidelity import block_fidelity, head_cos_line
from far.models.factory import check_input, check_labels, top1
from far.nn import FARAttention, MixerTaps, token_mixers
from far.utils.env import eval_mode, model_device, param_dtype
from far.utils.fs import atomic_write
from far.utils.plot import pyplot, save_figure

PARTS = ("mixer", "block")
PAIRS = ("attn_vs_far", "attn_vs_attn_jacobian", "attn_jacobian_vs_far")
PLOTS = ("block_cosine.png", "error_accumulation.png", "token_maps.png")
MAPS_FILE = "token_maps.npz"
MAX_PASS_ELEMENTS = 2 ** 25  # input entries of one Jacobian pass (its activations are a small multiple)


# ---------------------------------------------------------------- building blocks
def pre_proj_output(mixer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a token mixer (timm Attention, FARAttention, anything with `.proj`) hands to its output
    projection W_O for input x [B, T, C]: [B, T, H*d] (differentiable)."""
    seen = []
    handle = mixer.proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        mixer(x)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise RuntimeError(f"{type(mixer).__name__}.proj ran {len(seen)} times in one forward pass")
    return seen[0]


def attention_maps(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Attention probabilities [B, H, T, T] (rows: queries i, columns: keys j) of a timm Attention for
    input x [B, T, C]: softmax(q_i . k_j * scale) with its q/k norms, no mask."""
    if not all(hasattr(attn, a) for a in ("qkv", "num_heads", "head_dim", "scale")):
        raise ConfigError(f"attention maps need a timm Attention (qkv, num_heads, head_dim, scale); got "
                          f"{type(attn).__name__}")
    B, T, _ = x.shape
    H, d = attn.num_heads, attn.head_dim
    q, k, _ = attn.qkv(x).reshape(B, T, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def jacobian_maps(mixer: nn.Module, x: torch.Tensor, num_heads: int, rows_per_pass: int = 4096) -> torch.Tensor:
    """J [B, H, T, T]: J[b, h, i, j] = ||d o_{i,h} / d x_j||_F for one token mixer at input x [B, T, C],
    o = pre_proj_output (head h owns channels h*d..(h+1)*d), x_j all C channels of token j. Not normalised.

    Exact, by reverse mode: every output entry (i, channel) is one vector-Jacobian product; they run as a
    batch of copies of each image (a mixer treats batch items independently), `rows_per_pass` copies per
    backward pass over all images (fewer when a pass's input would exceed MAX_PASS_ELEMENTS entries)."""
    x = x.detach()
    B, T, C = x.shape
    with torch.no_grad():
        P = pre_proj_output(mixer, x[:1]).shape[-1]
    if P % num_heads:
        raise ConfigError(f"{type(mixer).__name__}: {P} output channels do not split into {num_heads} heads")
    R = T * P
    copies = max(1, min(rows_per_pass, MAX_PASS_ELEMENTS // max(T * C, 1)))  # bounds a pass's activations
    m = max(1, min(R, copies // max(B, 1)))
    sq = x.new_zeros(B, R, T)
    with torch.enable_grad():
        for r0 in range(0, R, m):
            mm = min(m, R - r0)
            xs = x[:, None].expand(B, mm, T, C).reshape(B * mm, T, C).clone().requires_grad_(True)
            out = pre_proj_output(mixer, xs).reshape(B, mm, R)
            pick = torch.zeros_like(out)
            pick[:, torch.arange(mm), r0 + torch.arange(mm)] = 1.0
            (g,) = torch.autograd.grad(out, xs, pick)
            sq[:, r0:r0 + mm] = g.reshape(B, mm, T, C).square().sum(-1)
    d = P // num_heads
    return sq.reshape(B, T, num_heads, d, T).sum(3).sqrt().permute(0, 2, 1, 3).contiguous()


def row_normalize(m: torch.Tensor) -> torch.Tensor:
    """Each row (last axis) divided by its sum (a zero row stays zero)."""
    s = m.sum(-1, keepdim=True)
    return m / torch.where(s > 0, s, torch.ones_like(s))


def map_similarity(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Two T x T maps: {"row_cos": mean over rows of the cosine of row i of a and row i of b,
    "pearson": the Pearson correlation of the flattened maps (0 when one map is constant)}."""
    a, b = a.double(), b.double()
    row_cos = float(F.cosine_similarity(a, b, dim=-1, eps=1e-300).mean())
    fa, fb = a.flatten() - a.mean(), b.flatten() - b.mean()
    den = float(fa.norm() * fb.norm())
    return {"row_cos": row_cos, "pearson": float(fa @ fb) / den if den > 0 else 0.0}


@contextlib.contextmanager
def replaced(teacher: nn.Module, student: nn.Module, blocks: Iterable[int], part: str = "mixer"):
    """The teacher, computing the given blocks with the student's (part "mixer": the token mixer
    `blocks[i].attn`; "block": the whole transformer block `blocks[i]`), on exit restored. Forward
    hooks, so neither model is modified; `with replaced(t, s, range(2)): t(x)`. A student of another dtype
    gets the teacher's activations in its own dtype and hands its output back in the teacher's."""
    if part not in PARTS:
        raise ConfigError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    if part == "mixer":
        src, dst = token_mixers(teacher, need_proj=False), token_mixers(student, need_proj=False)
    else:
        src, dst = list(teacher.blocks), list(student.blocks)
    handles = []
    try:
        for i in blocks:
            if not 0 <= i < min(len(src), len(dst)):
                raise ConfigError(f"block {i} does not exist (the models have {len(src)} and {len(dst)} blocks)")
            handles.append(src[i].register_forward_hook(_computed_by(dst[i]), with_kwargs=True))
        yield teacher
    finally:
        for h in handles:
            h.remove()


def _computed_by(other: nn.Module):
    """A forward hook that replaces a module's output by `other`'s on the same arguments (cast to other's dtype,
    the result cast back to the output's)."""
    dtype = param_dtype(other)

    def hook(mod, args, kwargs, out):
        res = other(*(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args), **kwargs)
        return res.to(out.dtype) if torch.is_tensor(res) and torch.is_tensor(out) else res
    return hook


def _features_and_logits(model: nn.Module, x: torch.Tensor):
    """(pre-logits features [B, F]: the classifier's input, logits [B, K]) of one forward pass. A distilled DeiT
    has two classifiers (get_classifier() is (head, head_dist)): its features are their inputs concatenated."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "head", None)
    heads = list(head) if isinstance(head, (tuple, list)) else [head]
    if not heads or not all(isinstance(h, nn.Module) and not isinstance(h, nn.Identity) for h in heads):
        raise ConfigError(f"{type(model).__name__} has no classifier head (num_classes=0?): agreement and "
                          "final features need one")
    seen = [[] for _ in heads]
    handles = [h.register_forward_pre_hook(lambda mod, args, store=store: store.append(args[0]))
               for h, store in zip(heads, seen)]
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat([store[-1] for store in seen], dim=-1), logits


class _Agreement:
    """Running sums for one model against the teacher: feature cosine, top-1 agreement, accuracy."""

    def __init__(self):
        self.cos = 0.0
        self.agree = self.correct = self.seen = self.labelled = 0

    def add(self, feat, logits, t_feat, t_pred, y) -> None:
        self.cos += float(F.cosine_similarity(feat.double(), t_feat.double(), dim=-1, eps=1e-12).sum())
        pred = top1(logits)  # -1 for a NaN/inf row: agrees with nothing, matches no label
        self.agree += int(((pred == t_pred) & (pred >= 0)).sum())
        valid = y >= 0
        self.labelled += int(valid.sum())
        self.correct += int((pred == y)[valid].sum())
        self.seen += feat.shape[0]

    def result(self) -> dict:
        return {"feature_cos": self.cos / max(self.seen, 1), "agreement": self.agree / max(self.seen, 1),
                "accuracy": self.correct / self.labelled if self.labelled else None}


def _outside_mixers(teacher: nn.Module, student: nn.Module) -> dict:
    """How far the student's parameters outside the token mixers are from the teacher's."""
    t_state = teacher.state_dict()
    worst, differ, n = 0.0, 0, 0
    for name, v in student.state_dict().items():
        if ".attn." in name or name not in t_state or t_state[name].shape != v.shape:
            continue
        n += 1
        diff = float((v.double() - t_state[name].double().to(v.device)).abs().max()) if v.numel() else 0.0
        worst = max(worst, diff)
        differ += diff > 0
    return {"tensors_compared": n, "tensors_differing": differ, "max_abs_diff": worst}


# ---------------------------------------------------------------- the analysis
def _check_pair(teacher: nn.Module, student: nn.Module):
    try:
        t_mix, s_mix = token_mixers(teacher), token_mixers(student)
    except ValueError as e:
        raise ConfigError(f"analysis needs two timm ViTs: {e}") from e
    if len(t_mix) != len(s_mix):
        raise ConfigError(f"teacher and student have {len(t_mix)} and {len(s_mix)} blocks; the student must be "
                          "the teacher's conversion")
    if any(isinstance(m, FARAttention) for m in t_mix):
        raise ConfigError("the teacher has FAR blocks; give the attention model as TEACHER")
    if not all(hasattr(m, "qkv") for m in t_mix):
        raise ConfigError("every teacher block must be a timm Attention (qkv) for the attention maps")
    return t_mix, s_mix


@torch.no_grad()
def _token_maps(teacher, student, t_mix, s_mix, x, progress_bar) -> dict:
    with MixerTaps(teacher, pre_proj=False) as taps:
        teacher(x)
        inputs, _ = taps.take()
    att, ja, jf = [], [], []
    for b, (tm, sm, xb) in enumerate(zip(t_mix, s_mix, inputs)):
        att.append(attention_maps(tm, xb))
        ja.append(row_normalize(jacobian_maps(tm, xb, tm.num_heads)))
        jf.append(row_normalize(jacobian_maps(sm, xb.to(param_dtype(sm)), tm.num_heads)).to(xb.dtype))
        if progress_bar is not None:
            progress_bar.update(1)
    arrays = {"attention": torch.stack(att), "jacobian_attention": torch.stack(ja), "jacobian_far": torch.stack(jf)}
    mean = {k: v.double().mean(1) for k, v in arrays.items()}  # [L, H, T, T]
    blocks = []
    for b in range(len(t_mix)):
        heads = []
        for h in range(mean["attention"].shape[1]):
            a, j_a, j_f = (mean[k][b, h] for k in ("attention", "jacobian_attention", "jacobian_far"))
            heads.append({"head": h, "attn_vs_far": map_similarity(a, j_f),
                          "attn_vs_attn_jacobian": map_similarity(a, j_a),
                          "attn_jacobian_vs_far": map_similarity(j_a, j_f)})
        blocks.append({"block": b, "heads": heads})
    L, n, H, T, _ = arrays["attention"].shape
    return {"images": n, "tokens": T, "heads": H, "blocks": blocks,
            "arrays": {k: v.float().cpu().numpy() for k, v in arrays.items()}}


@torch.no_grad()
def analyze(teacher: nn.Module, student: nn.Module, data, *, batch_size: int = 256, device=None,
            map_images: int = 4, parts: Iterable[str] = PARTS, progress: bool = False) -> dict:
    """Everything in the module docstring for `student` (FAR) against `teacher` (attention) on `data`.

    Both models run in eval mode (restored afterwards) where they are; the batches go to `device` (default: the
    student's), where both must be (block_fidelity checks it); the token maps
    are of the first `map_images` images of `data` whatever `batch_size` (all of them, if fewer); 0 skips them.
    Returns {"num_images", "agreement", "teacher_accuracy", "student_accuracy",
    "blocks" and "mean" (far.fidelity.block_fidelity's), "full_student": {"feature_cos", "agreement", "accuracy"},
    "partial": {part: [{"k", "replaced": k + 1, "feature_cos", "agreement", "accuracy"}]},
    "outside_mixers": {...}, "maps": {"images", "tokens", "heads", "blocks": [{"block", "heads": [{"head",
    pair: {"row_cos", "pearson"}}]}], "arrays": {"attention" | "jacobian_attention" | "jacobian_far":
    numpy [L, images, H, T, T]}} or None}. Only "maps"/"arrays" is not JSON (format_json drops it)."""
    if student is teacher:  # replacing a model's mixers by its own would hook them into themselves
        import copy

        student = copy.deepcopy(student)
    t_mix, s_mix = _check_pair(teacher, student)
    parts = tuple(parts)
    for part in parts:
        if part not in PARTS:
            raise ConfigError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    if map_images < 0:
        raise ConfigError(f"map_images must be >= 0, got {map_images}")
    device = model_device(student, device)
    t_dtype, s_dtype = param_dtype(teacher), param_dtype(student)  # each model gets the images in its own dtype
    fid = block_fidelity(teacher, student, data, batch_size=batch_size, device=device, progress=progress)
    L = len(t_mix)
    full = _Agreement()
    partial = {part: [_Agreement() for _ in range(L)] for part in parts}
    modes = contextlib.ExitStack()
    modes.enter_context(eval_mode(teacher, student))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(data) + (L if map_images else 0), unit="img", desc="partial replacement",
                   file=sys.stderr, dynamic_ncols=True, leave=False)
    maps = None
    try:
        first, have = [], 0  # the first map_images images, from as many batches as that takes
        for x, y in iterate_batches(data, batch_size, device=device):
            check_input(teacher, x.shape, "the data")
            check_labels(teacher, y, "the data")
            x_t = x.to(t_dtype)
            if have < map_images:
                first.append(x_t[:map_images - have].clone())
                have += first[-1].shape[0]
            t_feat, t_logits = _features_and_logits(teacher, x_t)
            t_pred = top1(t_logits)
            full.add(*_features_and_logits(student, x.to(s_dtype)), t_feat, t_pred, y)
            for part in parts:
                for k in range(L):
                    with replaced(teacher, student, range(k + 1), part):
                        partial[part][k].add(*_features_and_logits(teacher, x_t), t_feat, t_pred, y)
            if bar is not None:
                bar.update(x.shape[0])
        if map_images and first:
            if bar is not None:
                bar.set_description("token maps (per block)")
            maps = _token_maps(teacher, student, t_mix, s_mix, torch.cat(first), bar)
    finally:
        if bar is not None:
            bar.close()
        modes.close()
    if full.seen == 0:
        raise DataError("the dataset is empty")
    return {**fid, "full_student": full.result(),
            "partial": {part: [{"k": k, "replaced": k + 1, **a.result()} for k, a in enumerate(rows)]
                        for part, rows in partial.items()},
            "outside_mixers": _outside_mixers(teacher, student), "maps": maps}


def format_json(report: dict) -> dict:
    """The report without the map arrays (plain numbers only: what `far analyze --json` writes)."""
    out = dict(report)
    if out.get("maps") is not None:
        out["maps"] = {k: v for k, v in out["maps"].items() if k != "arrays"}
    return out


def save_maps(report: dict, path, *, force: bool = True) -> Optional[Path]:
    """The token maps (numpy [L, images, H, T, T] each) as a compressed .npz, atomically; None without maps."""
    if report.get("maps") is None:
        return None

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **report["maps"]["arrays"])

    return atomic_write(path, write, force=force)


# ---------------------------------------------------------------- text and figures
def format_analysis(report: dict) -> str:
    """The report as text: the per-block table, the partial-replacement table, the student, the maps."""
    def num(v, w=8, p=4):
        return f"{'-':>{w}}" if v is None else f"{v:>{w}.{p}f}"

    lines = ["per block: teacher's block input (isolated) | in the student's own forward pass; block output "
             "= before W_O",
             f"{'block':>5}  {'cos tok':>8} {'cos chan':>8} {'rel MSE':>8} {'scale':>8}   {'cos tok':>8} "
             f"{'cos chan':>8} {'rel MSE':>8} {'scale':>8}"]

    def cells(r):
        if r is None:
            return " ".join(num(None) for _ in range(4))
        return f"{num(r['cos'])} {num(r['token_cos'])} {num(r['rel_mse'])} {num(r['scale'], p=3)}"

    for blk in report["blocks"]:
        lines.append(f"{blk['block']:>5}  {cells(blk['isolated'])}   {cells(blk['in_model'])}")
    lines.append(f"{'mean':>5}  {cells(report['mean']['isolated'])}   {cells(report['mean']['in_model'])}")
    lines.append("('cos tok': cosine along tokens per channel, the paper's; 'cos chan': along channels per token)")
    lines.append(head_cos_line(report))
    lines.append("")
    parts = list(report["partial"])
    lines.append("partial replacement: blocks 0..k of the teacher replaced by the student's ("
                 + "; ".join({"mixer": "mixer = token mixer only", "block": "block = whole block"}[p] for p in parts)
                 + ")")
    head = f"{'k':>3}"
    for p in parts:
        head += f"  {p + ' feat cos':>15} {'agree':>7} {'acc':>7}"
    lines.append(head)
    for k in range(len(report["blocks"])):
        row = f"{k:>3}"
        for p in parts:
            r = report["partial"][p][k]
            acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}"
            row += f"  {r['feature_cos']:>15.4f} {100 * r['agreement']:>7.2f} {acc:>7}"
        lines.append(row)
    s = report["full_student"]
    acc = report["teacher_accuracy"]
    lines.append("")
    lines.append(f"full student: final-feature cosine {s['feature_cos']:.4f}, top-1 agreement "
                 f"{100 * s['agreement']:.2f}% on {report['num_images']} images"
                 + (f"; accuracy teacher {100 * acc:.2f}%, student {100 * s['accuracy']:.2f}%" if acc is not None else ""))
    o = report["outside_mixers"]
    lines.append(f"outside the token mixers, {o['tensors_differing']}/{o['tensors_compared']} student tensors differ "
                 f"from the teacher's (max |diff| {o['max_abs_diff']:.3g})")
    maps = report.get("maps")
    if maps:
        lines.append("")
        lines.append(f"token maps ({maps['images']} images, {maps['tokens']} tokens): A = attention probabilities, "
                     "J = row-normalised Jacobian norms; row cosine / Pearson")
        lines.append(f"{'block':>5} {'head':>4}  {'A vs J(FAR)':>15}  {'A vs J(attn)':>15}  {'J(attn) vs J(FAR)':>17}")
        for blk in maps["blocks"]:
            for h in blk["heads"]:
                cells = [f"{h[p]['row_cos']:.3f} / {h[p]['pearson']:.3f}" for p in PAIRS]
                lines.append(f"{blk['block']:>5} {h['head']:>4}  {cells[0]:>15}  {cells[1]:>15}  {cells[2]:>17}")
    return "\n".join(lines)


def plot_analysis(report: dict, out_dir, *, image: int = 0, head: int = 0, force: bool = True) -> Optional[List[str]]:
    """block_cosine.png, error_accumulation.png and (with maps) token_maps.png in `out_dir`; the maps
    figure shows `image` (an index into the map images) and `head`. `out_dir` is created if missing.
    Returns the paths, or None when matplotlib is missing (nothing is written then)."""
    plt = pyplot()
    if plt is None:
        return None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    maps = report.get("maps")
    if maps is not None and not (0 <= image < maps["images"] and 0 <= head < maps["heads"]):
        raise ConfigError(f"the maps have images 0..{maps['images'] - 1} and heads 0..{maps['heads'] - 1}; got image "
                          f"{image}, head {head}")
    written = []
    blocks = report["blocks"]
    L = len(blocks)
    # per-block cosines
    series = {"isolated, along tokens (paper)": [b["isolated"]["cos"] if b["isolated"] else None for b in blocks],
              "isolated, along channels": [b["isolated"]["token_cos"] if b["isolated"] else None for b in blocks],
              "in model, along tokens": [b["in_model"]["cos"] for b in blocks],
              "in model, along channels": [b["in_model"]["token_cos"] for b in blocks]}
    fig, ax = plt.subplots(figsize=(max(6.5, 1.5 * L + 2), 4.2))
    width = 0.8 / len(series)
    vals = [v for vs in series.values() for v in vs if v is not None]
    for i, (name, vs) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(L)]
        bars = ax.bar(xs, [v if v is not None else 0 for v in vs], width, label=name)
        for bar_, v in zip(bars, vs):
            if v is not None:
                ax.text(bar_.get_x() + bar_.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=6,
                        rotation=90)
        if i == 0:  # each head's share of the paper's cosine, as dots on its bar (reports before head_cos: none)
            heads = [(x + (h - (len(hc) - 1) / 2) * width / (len(hc) + 1), c)  # spread over the bar, head 0 left
                     for x, b in zip(xs, blocks) if b["isolated"]
                     for hc in [b["isolated"].get("head_cos", [])] for h, c in enumerate(hc)]
            if heads:
                ax.plot([x for x, _ in heads], [c for _, c in heads], "k.", ms=4,
                        label="isolated, per head (0, 1, ... left to right)")
                vals += [c for _, c in heads]
    low = min(vals, default=0.0)
    lo = low - 0.05 if low < 0 else max(0.0, low - 0.05)  # down to 0 at most, unless a cosine is negative
    ax.set_xticks(range(L))
    ax.set_xticklabels([f"block {b['block']}" for b in blocks])
    ax.set_ylim(lo, 1.0 + (1.0 - lo) * 0.12)
    ax.set_ylabel("cosine FAR block vs attention")
    ax.set_title(f"Per-block cosine (output before W_O), {report['num_images']} images")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    written.append(str(save_figure(fig, out_dir / PLOTS[0], dpi=120, force=force)))
    # error accumulation over depth
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    ks = list(range(1, L + 1))
    style = {"mixer": "o-", "block": "s--"}
    label = {"mixer": "token mixers 0..k replaced", "block": "whole blocks 0..k replaced"}
    for part, rows in report["partial"].items():
        a1.plot(ks, [r["feature_cos"] for r in rows], style[part], label=label[part])
        a2.plot(ks, [100 * r["agreement"] for r in rows], style[part], label=f"agreement, {label[part]}")
        if rows[0]["accuracy"] is not None:
            a2.plot(ks, [100 * r["accuracy"] for r in rows], style[part], alpha=0.5, label=f"accuracy, {label[part]}")
    s = report["full_student"]
    a1.plot([L], [s["feature_cos"]], "r*", markersize=12, label="full student")
    a2.plot([L], [100 * s["agreement"]], "r*", markersize=12, label="full student, agreement")
    if report["teacher_accuracy"] is not None:
        a2.axhline(100 * report["teacher_accuracy"], color="gray", linestyle=":", label="teacher accuracy")
    a1.set_title("final features (pre-logits): cosine with the teacher")
    a2.set_title("top-1 vs the teacher / accuracy (%)")
    for a in (a1, a2):
        a.set_xlabel("blocks replaced (0..k)")
        a.set_xticks(ks)
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    written.append(str(save_figure(fig, out_dir / PLOTS[1], dpi=120, force=force)))
    # token maps
    if maps is not None:
        arrays = maps["arrays"]
        names = (("attention", "A (attention probs)"), ("jacobian_attention", "J attention"),
                 ("jacobian_far", "J FAR"))
        fig, axes = plt.subplots(L, 3, figsize=(9, 3 * L), squeeze=False)
        for b in range(L):
            sim = maps["blocks"][b]["heads"][head]
            for c, (key, title) in enumerate(names):
                m = arrays[key][b, image, head]
                ax = axes[b][c]
                im = ax.imshow(m, cmap="viridis", vmin=0, vmax=float(np.quantile(m, 0.99)) or None)
                sub = "" if c == 0 else (f"\nvs A: row cos {sim['attn_vs_attn_jacobian']['row_cos']:.2f}, r "
                                         f"{sim['attn_vs_attn_jacobian']['pearson']:.2f}" if c == 1 else
                                         f"\nvs A: row cos {sim['attn_vs_far']['row_cos']:.2f}, r "
                                         f"{sim['attn_vs_far']['pearson']:.2f}")
                ax.set_title(f"block {b}: {title}{sub}", fontsize=8)
                ax.set_xlabel("token j (input)", fontsize=7)
                ax.set_ylabel("token i (output)", fontsize=7)
                ax.tick_params(labelsize=6)
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
        fig.suptitle(f"Token maps, image {image}, head {head} (scores: {maps['images']}-image means; colour "
                     "clipped at the 99th percentile)", fontsize=9)
        written.append(str(save_figure(fig, out_dir / PLOTS[2], dpi=110, force=force)))
    return written
