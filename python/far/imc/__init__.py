"""far.imc: accuracy of (FAR) ViTs on emulated ReRAM in-memory-computing crossbars.

    import far, far_kernels
    from far.imc import emulate, calibrate

    cfg = far_kernels.CrossbarConfig(adc_bits=6, adc_range="calibrated")
    emu = emulate(model, cfg, exclude="head")   # a copy; every other weight product on crossbars
    calibrate(emu, calib_batches, max_batches=4)
    logits = emu(images)

Weight products (nn.Linear, FAR's W_ih / recurrent W_hh / head_proj) run through
far_kernels.crossbar_matmul with weights programmed once; attention's activation x activation
products stay digital, quantized to cfg.input_bits, or (dynamic="crossbar") are written into crossbars per
input. See `emulate` for the full list.
"""
from far.imc.calibrate import calibrate
from far.imc.emulate import (DYNAMIC_MODES, EmulationReport, crossbar_attentions, crossbar_groups, crossbar_layers,
                             crossbar_products, emulate, emulation_targets, layer_seed, select_targets,
                             unemulated_products)
from far.imc.far_block import EMULATED_LSTM_MAPPING, LSTM_MAPPINGS, UnrolledFARAttention
from far.imc.layers import (CrossbarAttention, CrossbarGroupLinear, CrossbarLinear, GroupLinear, QuantizedAttention,
                            fake_quantize)

__all__ = [
    "CrossbarAttention",
    "DYNAMIC_MODES",
    "EMULATED_LSTM_MAPPING",
    "LSTM_MAPPINGS",
    "crossbar_attentions",
    "CrossbarGroupLinear",
    "CrossbarLinear",
    "GroupLinear",
    "EmulationReport",
    "QuantizedAttention",
    "UnrolledFARAttention",
    "calibrate",
    "crossbar_groups",
    "crossbar_layers",
    "crossbar_products",
    "emulate",
    "emulation_targets",
    "fake_quantize",
    "layer_seed",
    "select_targets",
    "unemulated_products",
]
