"""far.imc.calibrate: ADC ranges of an emulated model's crossbars from calibration data."""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
import torch.nn as nn

from far.data import iterate_batches
from far.errors import ConfigError
from far.imc.emulate import crossbar_attentions, crossbar_groups, crossbar_layers
from far.models import check_input, data_config
from far.utils.env import eval_mode

CALIBRATION_BATCH = 64  # images per batch when calibrate() is given a Dataset


def _batches(data, max_batches: Optional[int]) -> Iterable:
    if isinstance(data, torch.Tensor):
        data = [data]
    elif isinstance(data, torch.utils.data.Dataset):  # (image, label) items: batched here
        data = (x for x, _ in iterate_batches(data, CALIBRATION_BATCH))
    for i, b in enumerate(data):
        if max_batches is not None and i >= max_batches:
            return
        if isinstance(b, (tuple, list)):
            b = b[0]
        if isinstance(b, dict):
            raise TypeError("calibrate: batches must be tensors or (inputs, labels) tuples, got a dict")
        yield b


@torch.no_grad()
def calibrate(model: nn.Module, data, max_batches: Optional[int] = None, per_slice: bool = False,
              progress: bool = False) -> dict:
    """Set the ADC ranges of an emulated model's crossbars from calibration data (for
    adc_range="calibrated"; other configs accept ranges too but do not use them).

    Runs `data` (a tensor batch, an iterable of tensors or (inputs, labels) batches, e.g. a
    DataLoader, or a Dataset of (image, label), batched CALIBRATION_BATCH at a time; at most `max_batches`;
    float batches cast to the model's parameter dtype, empty ones skipped) through the model in eval mode.
    Every CrossbarLinear records the largest |partial sum| its reads produced per weight slice
    (far_kernels.crossbar_partial_sum_absmax) while running as an uncalibrated ADC would (range = p_max,
    i.e. adc_range "max"), so later layers see emulated activations. Then each layer gets r = that max
    (per_slice=True: one r per weight slice; else the max over slices). A layer that saw only zero partial
    sums gets r = p_max.
    Returns {layer name: r tensor}. The model's train/eval mode is restored afterwards.
    ConfigError for data in another form: one (inputs, labels) pair given as `data` itself (it would be
    read as two batches, the labels run through the model: pass [(inputs, labels)] or the inputs), or,
    for an image model (timm: data_config's input_size), a batch that is not [B, C, H, W] of its size.
    """
    layers = crossbar_layers(model) + crossbar_groups(model) + crossbar_attentions(model)
    if not layers:
        raise ValueError("calibrate: the model has no CrossbarLinear; emulate it first (far.imc.emulate)")
    if (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)
            and data[0].dim() >= 2 and data[1].dim() == 1 and not data[1].is_floating_point()
            and len(data[1]) == len(data[0])):
        raise ConfigError(f"calibrate: data is one (inputs {list(data[0].shape)}, labels {list(data[1].shape)}) "
                          "pair, which would be read as two batches (the labels run through the model); pass "
                          "[(inputs, labels)] or the inputs alone")
    image_size = data_config(model).get("input_size")  # (C, H, W) of an image model, else None
    modes = contextlib.ExitStack()
    modes.enter_context(eval_mode(model))
    dev = layers[0][1].device
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = p.dtype if p is not None else torch.float32  # float batches follow the model (a bf16 model, fp32 data)
    for _, m in layers:
        m.begin_calibration()
    seen = 0
    try:
        it = _batches(data, max_batches)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=max_batches, desc="calibrate", unit="batch", leave=False)
        for i, x in enumerate(it):
            if x.numel() == 0:  # nothing to record: an empty batch must not pass for calibration data
                continue
            if image_size is not None:  # the clear error, not one from deep inside timm
                if x.dim() != 4:
                    raise ConfigError(f"calibrate: batch {i} has shape {list(x.shape)}, but the model takes "
                                      f"image batches [B, C, H, W] = [B, {', '.join(map(str, image_size))}]"
                                      + ("; a single image x is the batch x[None]" if x.dim() == 3 else ""))
                check_input(model, x.shape, f"calibrate: batch {i}")
            model(x.to(dev, dtype) if x.is_floating_point() else x.to(dev))
            seen += 1
        if seen == 0:
            raise ValueError("calibrate: no calibration batches (empty data, only empty batches or max_batches=0)")
        out = {}
        for name, m in layers:
            r = m.end_calibration(per_slice)
            out.update(r if isinstance(r, dict) else {name: r})  # a group: one range per member product
        return out
    finally:
        for _, m in layers:
            m.end_calibration(None)  # no-op for the layers already done
        modes.close()
