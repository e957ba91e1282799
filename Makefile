# Two commands on a fresh machine (see README):  `make demo`  and  `make test`.
# Both install what they need first (pip packages, Debian's Fashion-MNIST, the far_kernels._C build).
PY ?= python3
PIP := $(PY) -m pip install -q --disable-pip-version-check
STAMP := build/.far-installed

.PHONY: demo test install deps clean

demo: $(STAMP)
	$(PY) -m far.cli demo

test: $(STAMP)
	lint-imports --no-cache
	$(PY) -m pytest -q

install: $(STAMP)

deps:
	$(PIP) "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) timm safetensors tqdm numpy matplotlib pytest pybind11 ninja triton import-linter onnx onnxruntime
	@if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; \
	  else echo "far: Fashion-MNIST missing: run 'sudo apt-get install -y dataset-fashion-mnist'"; fi; fi

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.h)
	$(MAKE) deps
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) --no-build-isolation --no-deps -e .
	@mkdir -p build && touch $(STAMP)

clean:
	rm -rf build far_kernels/_C*.so *.egg-info python/*.egg-info
