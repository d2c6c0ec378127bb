# ropebert — two commands for a newcomer: `make demo` and `make test`.
# Both create .venv if it is missing and install what they need into it.
#
# TORCH_SPEC pins the CPU build of torch that these machines install from local disk. A GPU user overrides it,
# e.g. `make demo TORCH_SPEC='torch>=2.10'` (the package itself only asks for a torch range).

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= demo,eval,dev
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.ropebert-installed
ARTIFACTS  ?= artifacts

.PHONY: all demo test venv clean bench gpu-check gpu-wheels

all: test

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	@touch $(STAMP)

venv: $(STAMP)

# The demo: the whole pipeline on this CPU (`ropebert demo`): docstring shards -> stage 1 from the offline
# all-MiniLM-L6-v2 (APE -> RoPE) -> mining -> stage 2 -> export + plain-transformers reload -> evaluation -> one
# summary table. Ctrl-C and run it again: finished steps are skipped, training resumes from its last checkpoint.
# `make demo DEMO_ARGS=--fresh` starts over; `make demo DEMO_ARGS=--full ARTIFACTS=artifacts-full` runs the whole
# recipe with the full-size evaluation (20-45 minutes on 2 cores; the figures in BENCHMARKS.md).
demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/ropebert demo --out $(ARTIFACTS) $(DEMO_ARGS)

# ROPEBERT_REQUIRE_TESTS makes a run that passes no test (nothing collected, or everything skipped) fail.
test: $(STAMP)
	ROPEBERT_REQUIRE_TESTS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/pytest -q tests

# All benchmarks (bench/loader.py, batch_memory.py, kernels.py, train_step.py), each in a capped subprocess, sized
# for the device (CPU: ~10 min on 2 cores); prints one table, details under artifacts/bench/.
# `make bench BENCH_ARGS=--quick` for a smaller smoke run.
bench: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) bench/run_all.py $(BENCH_ARGS)

# The GPU check (bench/gpu_check.py): every cuda-marked test, the GPU benchmarks and a bf16 fit with resume on one
# CUDA device in under 10 minutes, one report under artifacts/gpu-check/. No venv is made: on the device the image's
# python runs it (GPU_PY defaults to .venv's python where there is one, else python3).
# `make gpu-check GPU_CHECK_ARGS=--dry-run` checks the plan, imports and command lines on any machine;
# `make gpu-wheels` (here) builds the wheels the device image lacks into $(GPU_WHEELS), and on the device
# `make gpu-check GPU_CHECK_ARGS="--install-wheels $(GPU_WHEELS)"` installs them first (README, "GPU check").
GPU_PY     ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_WHEELS ?= .whl
gpu-check:
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(GPU_PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

gpu-wheels: $(STAMP)
	$(PY) bench/gpu_check.py --prepare-wheels $(GPU_WHEELS)

clean:
	rm -rf $(VENV) $(ARTIFACTS) .pytest_cache
