# flowalign: the two Quick-start commands are `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.flowalign-installed

.PHONY: demo test install clean-venv shapes-base bench

# Create the virtualenv and install flowalign with its test extras (about 90 s the first time, ~7 s after).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job: GRPO-align the shipped shapes model on this CPU and write runs/shapes_grpo/report.html.
demo: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/flowalign train configs/shapes_grpo.yaml

# Rebuild the shipped shapes base from scratch (docs/shapes.md): stage 1, stage 2, then install it as package data.
shapes-base: $(STAMP)
	$(BIN)/flowalign pretrain --config configs/shapes_pretrain.yaml --out runs/shapes_pretrain --threads 2
	$(BIN)/flowalign pretrain --config configs/shapes_pretrain_stage2.yaml --out runs/shapes_pretrain_stage2 --threads 2
	cp runs/shapes_pretrain_stage2/final/config.json runs/shapes_pretrain_stage2/final/model.safetensors flowalign/assets/shapes/

# The whole test suite (CPU, offline).
test: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
