"""Build of the FAR engine: the `far` and `far_kernels` packages and the far_kernels._C extension.

The C++ CPU kernels are always built. The CUDA kernels are added when nvcc and a CUDA build of
torch are present. Switches (environment variables):
  FAR_SKIP_CUDA_BUILD=1   build the CPU kernels only
  FAR_SKIP_EXT_BUILD=1    build no extension at all (pure-Python install; cpp/cuda backends unavailable)
  FAR_CUDA_ARCHS="9.0"    semicolon/comma-separated compute capabilities (default 9.0)
  MAX_JOBS=N              parallel compile jobs (torch's ninja builder)
Torch must be importable when this runs: `pip install --no-build-isolation -e .` (fast, uses the
installed torch) or plain `pip install .` (pyproject.toml pulls torch into the build environment).
"""
import os
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "python/far/version.py").read_text()).group(1)


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_arch_flags():
    archs = os.environ.get("FAR_CUDA_ARCHS", "9.0")
    flags = []
    for a in re.split(r"[;, ]+", archs.strip()):
        if not a:
            continue
        num = a.replace(".", "")
        if not num.isdigit():
            sys.exit(f"FAR_CUDA_ARCHS: '{a}' is not a compute capability like 9.0")
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    return flags


def _extensions():
    if _truthy("FAR_SKIP_EXT_BUILD"):
        print("far: FAR_SKIP_EXT_BUILD set, building no extension")
        return [], {}
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/include/cuda_runtime_api.h"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # torch may otherwise guess /usr/local from `which nvcc`
    from torch.utils import cpp_extension as ce
    import torch

    sources = ["csrc/bindings.cpp", "csrc/bilstm_cpu.cpp", "csrc/crossbar_cpu.cpp"]
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-Wno-psabi"]
    define_macros = []
    with_cuda = ((not _truthy("FAR_SKIP_CUDA_BUILD")) and torch.version.cuda is not None
                 and ce.CUDA_HOME is not None and os.path.exists(os.path.join(ce.CUDA_HOME, "include", "cuda_runtime_api.h")))
    if not _truthy("FAR_SKIP_CUDA_BUILD") and not with_cuda:
        print("far: no nvcc/CUDA_HOME or a CPU-only torch: building the CPU kernels only")
    kwargs = dict(name="far_kernels._C", include_dirs=[str(ROOT / "csrc")], extra_link_args=["-fopenmp"])
    if with_cuda:
        sources.append("csrc/cuda/bilstm_cuda.cu")
        define_macros.append(("FAR_WITH_CUDA", None))
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"] + _cuda_arch_flags()
        ext = ce.CUDAExtension(sources=sources, define_macros=define_macros,
                               extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    else:
        ext = ce.CppExtension(sources=sources, define_macros=define_macros,
                              extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="far-engine",
    version=VERSION,
    description="FAR: multi-head BiLSTM replacement of ViT attention, fused kernels and IMC crossbar emulation",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # far_kernels.csrc: the CUDA sources far_kernels.cuda_emu compiles for its CPU emulation, installed with the package
    package_dir={"far": "python/far", "far_kernels": "far_kernels", "far_kernels.csrc": "csrc"},
    packages=["far_kernels"] + ["far_kernels." + p for p in find_packages("far_kernels")] + ["far_kernels.csrc"]
    + ["far"] + ["far." + p for p in find_packages("python/far")],
    package_data={"far": ["zoo/*.safetensors", "imc/*.json"],  # the bundled model zoo, the IMC cost constants
                  "far_kernels.csrc": ["lstm_cell.h", "cuda/bilstm_cuda.cu", "cuda/bilstm_cuda.h", "cuda/emu/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4", "numpy", "safetensors", "timm>=1.0", "tqdm"],
    extras_require={"triton": ["triton"], "plot": ["matplotlib"], "onnx": ["onnx", "onnxruntime"], "test": ["pytest", "matplotlib", "import-linter"]},
    entry_points={"console_scripts": ["far=far.cli.main:main"]},
    zip_safe=False,
)
