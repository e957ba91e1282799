"""far_kernels: the FAR engine's kernel library (public ops, one dispatcher, one folder per op).

Imports torch only (Triton lazily, on first use of a triton backend); never the `far` package."""
from far_kernels.dispatch import (BACKENDS, BackendUnavailable, backend_reason, backend_report, extension_status,
                                  requested_backend)
from far_kernels.ops.bilstm_fused_scan import bilstm_fused_scan, bilstm_fused_scan_ref
from far_kernels.ops.bilstm_scan import bilstm_scan, bilstm_scan_ref
from far_kernels.ops.crossbar_matmul import (CrossbarConfig, CrossbarGroup, ProgrammedCrossbar, crossbar_matmul,
                                            crossbar_matmul_group, crossbar_matmul_group_ref, crossbar_matmul_loop,
                                            crossbar_matmul_ref, crossbar_partial_sum_absmax,
                                            crossbar_partial_sum_absmax_group, program_crossbar, program_group,
                                            program_stacked)

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "backend_reason",
    "backend_report",
    "extension_status",
    "requested_backend",
    "bilstm_scan",
    "bilstm_scan_ref",
    "bilstm_fused_scan",
    "bilstm_fused_scan_ref",
    "CrossbarConfig",
    "ProgrammedCrossbar",
    "program_crossbar",
    "crossbar_matmul",
    "crossbar_matmul_ref",
    "crossbar_matmul_loop",
    "crossbar_partial_sum_absmax",
    "CrossbarGroup",
    "program_group",
    "program_stacked",
    "crossbar_matmul_group",
    "crossbar_matmul_group_ref",
    "crossbar_partial_sum_absmax_group",
]
