# distill-ops: `make demo` sets everything up and runs the embedded default; `make test` runs the suite.
PY      ?= python3
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
PIP     := $(PYTHON) -m pip
# The CUDA build of torch: it runs on the CPU too, and it is what compiles the CUDA extension.
TORCH   ?= torch==2.14.1
DEPS    := numpy pytest pytest-xdist ninja setuptools wheel safetensors transformers tokenizers tqdm pyyaml matplotlib accelerate
# The peers the tests and benchmarks compare against (their real code, not transcriptions), pinned
# to the versions the README says the tests check.
# torchtune 0.6.1 imports torchao's nf4tensor, which later torchao releases dropped.
PEERS   := trl==1.16.0 liger-kernel==0.8.5 torchtune==0.6.1 torchao==0.11.0
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

# The kernel tests that `make test` reruns on csrc/cuda's kernels compiled for the CPU emulator
# (tests/cuda_emu), under AddressSanitizer where gcc has it: their backend="cpu" cases, and
# test_cuda_emu.py, so CI runs the CUDA code paths and checks their memory accesses.
EMU_TESTS := tests/test_native.py $(wildcard tests/test_dense_*.py tests/test_sparse_*.py) \
             tests/test_topk.py tests/test_fused_linear.py tests/test_cuda_emu.py

.PHONY: setup build demo test test-emu test-gpu check-spills bench bench-cpu peers-dir \
        device-twin device-py device-prebuilt test-twin floor-venv floor-py test-floor clean

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

# pytest-xdist's workers where it is installed (one per core: the tests are independent)
XDIST = $$($(PYTHON) -c "import xdist" 2>/dev/null && echo "-n auto")

# (The plain pass leaves test_cuda_emu.py to the emulator's pass, which runs it under
# AddressSanitizer where gcc has it, else plainly: in both it cost a second emulator build.)
test: $(VENV)/.built
	$(PYTHON) -m pytest -q -ra --durations=15 $(XDIST) --ignore=tests/test_cuda_emu.py
	$(PYTHON) tests/cuda_emu/run.py -q -ra $(XDIST) -k "cpu or cuda_emu" $(EMU_TESTS)

test-emu: $(VENV)/.built
	$(PYTHON) tests/cuda_emu/run.py -q -ra $(XDIST) -k "cpu or cuda_emu" $(EMU_TESTS)

# ptxas's register report of every CUDA kernel (sm_90); fails when one other than fp64 spills.
# SPILLS_LOG=.prebuilt/build.log: the report the twin's build made (device-prebuilt), not compiled.
check-spills: $(VENV)/.deps
	$(PYTHON) -m bench.ptxas_spills $(if $(SPILLS_LOG),--log $(SPILLS_LOG))

test-gpu: $(VENV)/.built
	$(PYTHON) -m pytest -q -ra -m cuda

bench: $(VENV)/.built
	$(PYTHON) -m bench all --device cuda

# The pure-Python peers (Liger-Kernel, TRL) copied into .peers/ (git-ignored), with their
# .dist-info (the bench JSON records their versions), so a device run can carry them to a GPU
# machine that has no network: bench/gpu_check.sh puts .peers on PYTHONPATH.
# TRL's GKD trainer module imports `datasets`, which the GPU image lacks (with `dill`; it has the
# rest of what datasets needs: pyarrow, pandas, multiprocess, xxhash, fsspec).
PEER_DISTS := liger-kernel trl datasets dill
peers-dir: $(VENV)/.deps
	rm -rf .peers
	$(PYTHON) -m bench.peers_dir .peers $(PEER_DISTS)

# The GPU machine's own Python on this machine (bench/prebuilt.py): Python 3.12, torch 2.11.0+cu130
# (with its Triton 3.6) and the image's transformers, so `make test-twin` runs the suite on the
# CPU with the versions the GPU checks will meet, and `make device-prebuilt` builds the extension
# for that machine ahead (sm_90 only), into .prebuilt/ for run(carry=[".prebuilt", ".peers"]).
DEVICE_PY   ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
DEVICE_VENV ?= .venv-device
# numpy < 2.4: Triton 3.6's interpreter converts 1-element arrays to Python ints, which numpy 2.4
# refuses (the GPU's own numpy is 2.5, but there Triton compiles instead of interpreting).
DEVICE_DEPS := torch==2.11.0 transformers==5.17.0 tokenizers==0.23.2 accelerate==1.15.0 \
               "numpy<2.4" pytest pytest-xdist ninja setuptools wheel safetensors tqdm pyyaml \
               matplotlib pyarrow pandas multiprocess xxhash fsspec

# A venv of another Python with pinned packages: $(call other_venv,PYTHON,VENV,PACKAGES)
define other_venv
	$(1) -m venv $(2)
	$(2)/bin/python -m pip install -q --upgrade pip
	$(2)/bin/python -m pip install -q $(3)
	touch $@
endef

$(DEVICE_VENV)/.deps:
	$(call other_venv,$(DEVICE_PY),$(DEVICE_VENV),$(DEVICE_DEPS))

device-twin: $(DEVICE_VENV)/.deps

# the twin's Python, for .ci/run to ask whether it exists here
device-py:
	@echo $(DEVICE_PY)

.prebuilt/stamp.json: $(DEVICE_VENV)/.deps $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(DEVICE_VENV)/bin/python -m bench.prebuilt build

device-prebuilt: .prebuilt/stamp.json

# the whole pytest suite under the twin, on the prebuilt extension (CUDA compiled against torch
# 2.11's headers too) and the carried peers (.peers)
# (Not test_cuda_emu.py: the emulator runs csrc/cuda's kernels compiled as C++ for the CPU, which
# no torch release changes, and it is the suite's slowest file: `make test` runs it.)
test-twin: .prebuilt/stamp.json peers-dir
	$(DEVICE_VENV)/bin/python -m bench.prebuilt install
	PYTHONPATH=$(CURDIR)/.peers $(DEVICE_VENV)/bin/python -m pytest -q -ra --durations=15 -n auto \
	  -p no:cacheprovider --ignore=tests/test_cuda_emu.py

# The oldest torch pyproject.toml accepts (2.8.0, with its Triton 3.4), on the oldest Python it
# accepts (3.10): `make test-floor` runs the loss API, compile (tensor hyperparameters included),
# the HF Trainer integration, the trainer and the documentation's examples there, on the torch
# and Triton (interpreter) backends. Not the C++ extension (no build: the .so files of the other
# environments are for other Pythons, so this one imports none); 2026-12-07 it built and passed
# the whole suite at 2.8.0 once by hand (bench/NOTES.md).
FLOOR_PY    ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10) python3.10)
FLOOR_VENV  ?= .venv-floor
FLOOR_DEPS  := torch==2.8.0 transformers==5.17.0 tokenizers==0.23.2 accelerate==1.15.0 "numpy<2.4" \
               pytest pytest-xdist safetensors tqdm pyyaml matplotlib setuptools wheel
FLOOR_TESTS := tests/test_public_api.py tests/test_dense_api.py tests/test_sparse_loss.py \
               tests/test_topk.py tests/test_fused_linear.py tests/test_dense_compile.py \
               tests/test_sparse_compile.py tests/test_integrations_hf.py \
               tests/test_integrations_hf_shard.py tests/test_trainer.py \
               tests/test_packaging.py tests/test_doc_examples.py \
               tests/test_tensor_hyperparameters.py

$(FLOOR_VENV)/.deps:
	$(call other_venv,$(FLOOR_PY),$(FLOOR_VENV),$(FLOOR_DEPS))

floor-venv: $(FLOOR_VENV)/.deps

# the floor's Python, for .ci/run to ask whether it exists here
floor-py:
	@echo $(FLOOR_PY)

test-floor: $(FLOOR_VENV)/.deps
	$(FLOOR_VENV)/bin/python -m pytest -q -ra -n auto -p no:cacheprovider $(FLOOR_TESTS)

bench-cpu: $(VENV)/.built
	$(PYTHON) -m bench dense --device cpu

clean:
	rm -rf build *.egg-info distill_ops/_C*.so $(VENV) $(DEVICE_VENV) $(FLOOR_VENV) .prebuilt
