# moe_jax: `make run` trains the tiny Switch model on tiny Shakespeare; `make test` runs the
# test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/switch_tiny
# more `--config.KEY=VALUE` for `make run`, e.g. TRAIN_FLAGS=--config.train.num_steps=1200
TRAIN_FLAGS ?=
# On a CPU host (no NVIDIA GPU or TPU device file), glibc's malloc keeps freed memory instead of
# unmapping it: XLA's CPU runtime frees and reallocates every step's buffers, and each mapping
# faults its pages in again (README, "Speed on a CPU"). A GLIBC_TUNABLES already set is kept.
CPU_TUNABLES := glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295
ALLOCATOR := $(if $(wildcard /dev/nvidia0 /dev/accel0 /dev/vfio/0),,GLIBC_TUNABLES=$${GLIBC_TUNABLES:-$(CPU_TUNABLES)})

# pip constraints: the versions the suite passed with (README, "Pinned versions"); CONSTRAINTS=
# (empty) installs the newest versions setup.py allows
CONSTRAINTS ?= constraints.txt
PIP_CONSTRAINTS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: venv test lint run bench bench-accel constraints clean

$(VENV)/.installed: setup.py $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_CONSTRAINTS) -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile tests

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# the README's first model: its generate and score examples read $(WORKDIR)
run: venv
	$(ALLOCATOR) $(PY) -m moe_jax.train --config=configs/switch.py:tiny \
		--config.data.name=tiny_shakespeare --workdir=$(WORKDIR) $(TRAIN_FLAGS)

# the MoE layer table of experiments/BENCHMARKS.md (about 10 minutes on 2 cores)
bench: venv
	$(ALLOCATOR) $(PY) experiments/benchmark_moe.py --experts 8,32,64,128 --k 2 --backends gather,dropless

# on a GPU or TPU host, with JAX installed for it (README): the MoE layer table in bfloat16, then
# GLaM 0.1B/64E's training step and its MFU; it stops at once on a host with only a CPU.
# PEAK_TFLOPS=<the chip's bf16 peak> adds MFU against the datasheet peak.
bench-accel: venv
	$(PY) -m experiments.benchmark_moe --platform accelerator --dtype bfloat16 --tokens 65536 \
		--seq-len 2048 --d-model 1024 --d-ff 4096 --experts 8,64 --k 2 \
		--backends gather,dropless,einsum --group-size 4096
	$(PY) -m experiments.benchmark_train --platform accelerator --config configs/glam.py:0.1b_64e \
		--dtype bfloat16 --ceiling-size 8192 --steps 10 --set train.batch_size=8 \
		--set train.seq_len=1024 $(if $(PEAK_TFLOPS),--peak-tflops $(PEAK_TFLOPS))

# writes constraints.txt from the venv's installed versions (after `make test` passed on them)
constraints: venv
	{ sed -n '1,2p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^#' \
		| sed 's/+cpu$$//'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
