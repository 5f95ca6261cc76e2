# Daily commands. `make train` and `make test` work on a fresh machine: they create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/fashion_mnist_cond.yaml
ROOT ?= runs
ARGS ?=
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
# `make sample`'s checkpoint: empty = `--ckpt_path last`, the newest last.ckpt of CONFIG's run (its run_name under
# ROOT), never another run's (a classifier's, another recipe's); CKPT=path: that file.
CKPT ?=
NUM_SAMPLES ?= 64
# Extra sampling options for `make sample` (empty: the config's own sampler and guidance), e.g. autoguidance by the
# run's own early EMA: GUIDANCE="--model.guidance.model posthoc_ema@0.25 --model.guidance.autoguidance_scale 1.5"
# (docs/samplers.md#autoguidance; docs/quality.md measures it on the quickstart).
GUIDANCE ?=
# bf16 autocast for `make train` where the CPU computes bf16 natively (AVX-512 BF16 or AMX: 1.4x more steps per
# minute); fp32 elsewhere, where emulated bf16 would be slower than fp32. Override: make train PRECISION=32-true.
PRECISION ?= $(shell grep -qsE 'avx512_bf16|amx_bf16' /proc/cpuinfo && echo bf16-mixed || echo 32-true)
OUT ?= $(ROOT)/samples/$(shell date +%Y%m%d-%H%M%S)
# `make train MINUTES=30`: the run's total training time (empty: the config's, 15 minutes for the quickstart), passed
# as --trainer.max_time DD:HH:MM:SS (90 -> 00:01:30:00; decimals allowed, 7.5 -> 00:00:07:30). It sets the
# TimeBudget's duration; with ARGS="--ckpt_path last" it continues a finished run up to that total.
MINUTES ?=
MAX_TIME = $(if $(strip $(MINUTES)),--trainer.max_time $(or $(shell echo '$(strip $(MINUTES))' | awk \
	'/^[0-9]+([.][0-9]+)?$$/ && $$1 > 0 { s = int($$1 * 60 + 0.5); \
	printf "%02d:%02d:%02d:%02d", s / 86400, s % 86400 / 3600, s % 3600 / 60, s % 60 }'),\
	$(error MINUTES=$(MINUTES) is not a positive number of minutes; e.g. make train MINUTES=30)))

.PHONY: install data train sample test lint format benchmark clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev,bench]'
	touch $@

# The offline default data set: Debian's dataset-fashion-mnist package (original idx files).
data:
	@if [ -d $(FASHION_MNIST_DIR) ]; then echo "Fashion-MNIST found in $(FASHION_MNIST_DIR)"; \
	elif command -v apt-get >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	else echo "No apt-get: put the Fashion-MNIST idx files in data/FashionMNIST/raw and pass --data.data_dir data"; fi

# Offline quickstart: 15 minutes of class-conditional Fashion-MNIST training on the CPU (configs/fashion_mnist_cond.yaml),
# ending with a sample grid and a checkpoint; CONFIG=configs/fashion_mnist.yaml: the unconditional recipe.
train: install data
	$(BIN)/python -m src.main fit --config $(CONFIG) --trainer.default_root_dir $(ROOT) --trainer.precision $(PRECISION) $(MAX_TIME) $(ARGS)

# NUM_SAMPLES PNG files in the folder OUT and their grid OUT.png (one column per class for a conditional model),
# from CONFIG's newest checkpoint under ROOT (or CKPT=path), with the EMA weights.
sample: install
	$(BIN)/python -m src.main predict --config $(CONFIG) --ckpt_path $(or $(CKPT),last) \
		--data.num_samples $(NUM_SAMPLES) --output_dir $(OUT) --grid_path $(patsubst %/,%,$(OUT)).png \
		--trainer.default_root_dir $(ROOT) $(GUIDANCE) $(ARGS)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks notebooks
	$(BIN)/ruff format --check src tests benchmarks notebooks

format: install
	$(BIN)/ruff check --fix src tests benchmarks notebooks
	$(BIN)/ruff format src tests benchmarks notebooks

benchmark: install
	$(BIN)/python benchmarks/unet_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
