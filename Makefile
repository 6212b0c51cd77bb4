# The README's two commands are `make demo` and `make test`; both install first.
# torch is installed only when missing, as torch==2.13.0 (a CPU build on CPU machines here); an
# existing torch (e.g. a CUDA build) is kept. The extension builds against it (--no-build-isolation).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test test-fast aot

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -q "setuptools>=64" wheel "triton>=3.2" "deepspeed>=0.15" tokenizers safetensors matplotlib tqdm numpy \
		pytest pytest-timeout pytest-benchmark ninja
	$(PIP) install -q --no-build-isolation -e .

demo: install
	fastvl info


test: install
	$(PYTHON) -m fastvl.aot
	$(PYTHON) -m pytest -q

aot:
	$(PYTHON) -m fastvl.aot
