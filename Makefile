# distill-ops: `make demo` sets everything up and runs the embedded default; `make test` runs the suite.
PY      ?= python3
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
PIP     := $(PYTHON) -m pip
# The CUDA build of torch: it runs on the CPU too, and it is what compiles the CUDA extension.
TORCH   ?= torch==2.14.1
DEPS    := numpy pytest ninja setuptools wheel safetensors transformers tokenizers tqdm pyyaml matplotlib accelerate
# The peers the tests and benchmarks compare against (their real code, not transcriptions).
# torchtune 0.6.1 imports torchao's nf4tensor, which later torchao releases dropped.
PEERS   := trl liger-kernel torchtune torchao==0.11.0
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

# The kernel tests that `make test` reruns on csrc/cuda's kernels compiled for the CPU emulator
# (tests/cuda_emu), under AddressSanitizer where gcc has it: their backend="cpu" cases, and
# test_cuda_emu.py, so CI runs the CUDA code paths and checks their memory accesses.
EMU_TESTS := tests/test_native.py $(wildcard tests/test_dense_*.py tests/test_sparse_*.py) \
             tests/test_topk.py tests/test_fused_linear.py tests/test_cuda_emu.py

.PHONY: setup build demo test test-emu test-gpu check-spills bench bench-cpu peers-dir clean

$(VENV)/.deps:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)" $(DEPS) $(PEERS)
	touch $@

# Rebuilt whenever a C++/CUDA source changes.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

setup build: $(VENV)/.built

demo: $(VENV)/.built
	$(PYTHON) -m distill_ops.trainer.demo

test: $(VENV)/.built
	$(PYTHON) -m pytest -q -ra
	$(PYTHON) tests/cuda_emu/run.py -q -ra -k "cpu or cuda_emu" $(EMU_TESTS)

test-emu: $(VENV)/.built
	$(PYTHON) tests/cuda_emu/run.py -q -ra -k "cpu or cuda_emu" $(EMU_TESTS)

# ptxas's register report of every CUDA kernel (sm_90); fails when one other than fp64 spills.
check-spills: $(VENV)/.deps
	$(PYTHON) -m bench.ptxas_spills

test-gpu: $(VENV)/.built
	$(PYTHON) -m pytest -q -ra -m cuda

bench: $(VENV)/.built
	$(PYTHON) -m bench all --device cuda

# The pure-Python peers (Liger-Kernel, TRL) copied into .peers/ (git-ignored) so a device run can
# carry them to a GPU machine that has no network: bench/gpu_check.sh puts .peers on PYTHONPATH.
peers-dir: $(VENV)/.deps
	rm -rf .peers && mkdir -p .peers
	cp -r $$($(PYTHON) -c "import liger_kernel, os; print(os.path.dirname(liger_kernel.__file__))") .peers/
	cp -r $$($(PYTHON) -c "import trl, os; print(os.path.dirname(trl.__file__))") .peers/
	find .peers -name __pycache__ -prune -exec rm -rf {} +

bench-cpu: $(VENV)/.built
	$(PYTHON) -m bench dense --device cpu

clean:
	rm -rf build *.egg-info distill_ops/_C*.so $(VENV)
