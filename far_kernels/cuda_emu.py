"""Run the CUDA scan kernels (csrc/cuda/bilstm_cuda.cu) on the CPU, through a host emulation of the CUDA features
they use (csrc/cuda/emu/cuda_emu.h: fibers for threads, barriers, warp shuffles, mma.sync m16n8k16, poisoned
shared memory, launch limits).

No GPU has run these kernels; Triton's have the interpreter, these had only nvcc's compile check. The emulation
compiles the same source with g++ (`-DFAR_CUDA_EMU`), host launcher included, so its path choice, persistent item
loop, fragment layouts and pruned-unit stores run against bilstm_scan_ref in CI. It says nothing about speed,
occupancy or registers: the tests under tests/kernels/ops/test_bilstm_scan_cuda_emu.py are correctness only.

    >>> from far_kernels import cuda_emu
    >>> out, launches = cuda_emu.scan(gx, w_hh, [[64, 37], [0, 64]], path="mma", sms=4)

`scan` takes CPU tensors in bilstm_scan's layout and returns the output plus the launches it made (kernel name with
its template arguments, grid, block, dynamic shared memory). The device is described by `sms`,
`blocks_per_sm` (the occupancy every kernel gets) and `optin_smem`, so a test can steer the host side into each
batch tile and into blocks that run many items. Inputs are placed between NaN guard bands; a kernel that writes
outside its output, or whose result depends on reading outside its inputs, fails the call (ValueError) or the
comparison.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch

from far_kernels.ops.bilstm_scan import check_scan_inputs

_SOURCES = ("cuda/emu/emu_entry.cpp", "cuda/emu/cuda_emu.h", "cuda/bilstm_cuda.cu", "cuda/bilstm_cuda.h",
            "lstm_cell.h")
# the sources: the copy a wheel installs inside this package (setup.py: far_kernels.csrc), else a checkout's csrc/
_CSRC = next((d for d in (Path(__file__).resolve().parent / "csrc", Path(__file__).resolve().parent.parent / "csrc")
              if (d / _SOURCES[0]).is_file()), Path(__file__).resolve().parent.parent / "csrc")
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
PATHS = {"auto": 0, "fma": 1, "mma": 2}
GUARD = 64  # elements of NaN on either side of every buffer the kernel sees
TANH_APPROX_REL_ERR = 2.0 ** -11  # tanh.approx.f32: "maximum relative error over the entire range" (PTX ISA 9.1)
TANH_BIAS_MODES = {"up": 0, "down": 1, "hashed": 2}

_lock = threading.Lock()
_libs: dict = {}


def cuda_include_dir() -> Optional[Path]:
    """The CUDA toolkit's include folder (cuda_fp16.h, driver_types.h), or None: $CUDA_HOME, then nvcc's, then
    /usr/local/cuda."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for c in candidates:
        if (c / "cuda_fp16.h").is_file() and (c / "driver_types.h").is_file():
            return c
    return None


def unavailable_reason(csrc: Optional[Union[str, Path]] = None) -> Optional[str]:
    """Why the emulation cannot be built here, or None."""
    root = Path(csrc) if csrc is not None else _CSRC
    if not (root / _SOURCES[0]).is_file():
        return f"the CUDA sources are not next to this package ({root / _SOURCES[0]} is missing)"
    if shutil.which("g++") is None:
        return "no g++ on PATH"
    if cuda_include_dir() is None:
        return "no CUDA toolkit headers (cuda_fp16.h): set CUDA_HOME"
    return None


def _source_hash(root: Path) -> str:
    h = hashlib.sha256()
    for s in _SOURCES:
        h.update(s.encode())
        h.update((root / s).read_bytes())
    return h.hexdigest()[:16]


def build(build_dir: Optional[Union[str, Path]] = None, csrc: Optional[Union[str, Path]] = None,
          opt: str = "-O2") -> Path:
    """Compile the emulation library (about 10 s) from `csrc` (default: the sources installed with this package, or
    a checkout's csrc/ beside it) into `build_dir` (default: a folder under the system temp dir named by the sources'
    hash, reused while they do not change) and return its path. `opt`: g++'s optimization flag (-O0 builds in half
    the time, runs slower)."""
    reason = unavailable_reason(csrc)
    if reason:
        raise RuntimeError(f"the CUDA emulation cannot be built: {reason}")
    root = Path(csrc) if csrc is not None else _CSRC
    if opt not in ("-O0", "-O1", "-O2", "-O3"):
        raise ValueError(f"opt must be -O0 .. -O3, got {opt!r}")
    tag = _source_hash(root) + opt.replace("-", "")
    folder = Path(build_dir) if build_dir is not None else Path(tempfile.gettempdir()) / f"far-cuda-emu-{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    lib = folder / f"libfar_cuda_emu-{tag}.so"
    if lib.is_file():
        return lib
    tmp = folder / f".{lib.name}.{os.getpid()}.tmp"
    # hidden visibility: two builds loaded in one process (a test's mutated copy) keep separate emulator states
    cmd = ["g++", "-std=c++20", opt, "-fno-strict-aliasing", "-fvisibility=hidden", "-shared", "-fPIC",
           "-Wno-unknown-pragmas", "-Wno-psabi", f"-I{cuda_include_dir()}", str(root / _SOURCES[0]), "-o", str(tmp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building the CUDA emulation failed ({' '.join(cmd)}):\n{res.stderr[-4000:]}")
    os.replace(tmp, lib)
    return lib


def load(build_dir: Optional[Union[str, Path]] = None, csrc: Optional[Union[str, Path]] = None,
         opt: str = "-O2") -> ctypes.CDLL:
    """The emulation library built from `csrc` (built on first use, one per source tree and process)."""
    with _lock:
        path = build(build_dir, csrc, opt)
        if path not in _libs:
            lib = ctypes.CDLL(str(path))
            lib.far_emu_bilstm_scan.restype = ctypes.c_char_p
            lib.far_emu_bilstm_scan.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                                ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_int] * 5 + [
                                                    ctypes.c_uint, ctypes.c_float, ctypes.c_int]
            lib.far_emu_launches.restype = ctypes.c_char_p
            lib.far_emu_launches.argtypes = []
            _libs[path] = lib
        return _libs[path]


@dataclass(frozen=True)
class Launch:
    kernel: str  # e.g. "void far::{anonymous}::bilstm_mma_kernel(Params) [with T = __half; int KT = 4; int NT = 2]"
    grid: int
    block: int
    shmem: int

    @property
    def name(self) -> str:
        """Kernel and template arguments, short: "bilstm_mma_kernel<T=__half, KT=4, NT=2>"."""
        fn = self.kernel.split("(")[0].split("::")[-1]
        args = self.kernel.split("[with ", 1)[1].rstrip("]") if "[with " in self.kernel else ""
        args = ", ".join(a.strip().split()[-3] + "=" + a.strip().split()[-1] if a.strip().startswith("int ")
                         else a.strip().replace(" = ", "=") for a in args.split(";") if a.strip())
        return f"{fn}<{args}>" if args else fn


def _guarded(t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A NaN-filled buffer with `t` copied into its middle; returns (buffer, view)."""
    buf = torch.full((t.numel() + 2 * GUARD,), float("nan"), dtype=t.dtype)
    view = buf[GUARD:GUARD + t.numel()].view(t.shape)
    view.copy_(t)
    return buf, view


def scan(gx: torch.Tensor, w_hh: torch.Tensor, hidden_sizes: Union[torch.Tensor, Sequence[Sequence[int]]], *,
         path: str = "auto", fast_tanh: bool = False, sms: int = 132, blocks_per_sm: int = 1,
         optin_smem: int = 232448, schedule_seed: int = 0, tanh_bias: float = 0.0, tanh_bias_mode: str = "up",
         lib: Optional[ctypes.CDLL] = None) -> Tuple[torch.Tensor, List[Launch]]:
    """bilstm_scan's cuda backend, emulated: CPU tensors in (gx [H, B, T, 2, 4n] fp32/fp16/bf16, w_hh [H, 2, 4n, n]
    any float dtype, converted to fp32 as the cuda backend does), h [H, B, T, 2, n] and the launches out.
    `path`/`fast_tanh` are FAR_CUDA_SCAN_PATH / FAR_CUDA_FAST_TANH; `sms`, `blocks_per_sm`, `optin_smem` describe the
    emulated GPU; `schedule_seed` != 0 runs blocks and threads in a seeded random order. The output starts as NaN,
    so a unit the kernel never writes stays NaN. `lib`: a library from load() (default: the package's sources).
    With fast_tanh, tanh.approx.f32 is std::tanh times (1 + tanh_bias * r): r = +1 ("up"), -1 ("down"), or a sign
    that changes with the argument ("hashed"); tanh_bias = TANH_APPROX_REL_ERR puts the ISA's worst case on every
    activation."""
    if gx.device.type != "cpu" or w_hh.device.type != "cpu":
        raise ValueError("the CUDA emulation runs on CPU tensors")
    if gx.dtype not in _DTYPES:
        raise ValueError(f"gx must be float32, float16 or bfloat16, got {gx.dtype}")
    if tanh_bias_mode not in TANH_BIAS_MODES:
        raise ValueError(f"tanh_bias_mode must be one of {', '.join(TANH_BIAS_MODES)}, got {tanh_bias_mode!r}")
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    hs = check_scan_inputs(gx, w_hh, hidden_sizes).to(torch.int64).contiguous()
    H, B, T, _, G = gx.shape
    n = G // 4
    gx_buf, gx_v = _guarded(gx.contiguous())
    w_buf, w_v = _guarded(w_hh.to(torch.float32).contiguous())
    out_buf, out_v = _guarded(torch.full((H, B, T, 2, n), float("nan"), dtype=gx.dtype))
    before = (gx_buf.clone(), w_buf.clone())
    guard0 = out_buf[:GUARD].clone()
    lib = lib if lib is not None else load()
    with _lock:  # the emulation keeps one global state
        err = lib.far_emu_bilstm_scan(_DTYPES[gx.dtype], gx_v.data_ptr(), w_v.data_ptr(), hs.data_ptr(),
                                      out_v.data_ptr(), H, B, T, n, PATHS[path], int(fast_tanh), sms, blocks_per_sm,
                                      optin_smem, schedule_seed, tanh_bias, TANH_BIAS_MODES[tanh_bias_mode])
        text = lib.far_emu_launches().decode()
    if err is not None:
        raise RuntimeError(err.decode())
    launches = [Launch(k, int(g), int(b), int(s)) for k, g, b, s in (line.split("\t") for line in text.splitlines())]
    for name, buf, old in (("gx", gx_buf, before[0]), ("w_hh", w_buf, before[1])):
        if not _same_bits(buf, old):
            raise ValueError(f"the kernel wrote into its input {name} or its guard bands")
    if not (_same_bits(out_buf[:GUARD], guard0) and _same_bits(out_buf[-GUARD:], guard0)):
        raise ValueError("the kernel wrote outside its output (the NaN guard bands changed)")
    return out_v.clone(), launches


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.dtype.itemsize]
    return torch.equal(a.view(bits), b.view(bits))
