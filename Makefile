# Two commands do all the set-up: `make demo` and `make test`. Both install into .venv.
# The PyTorch build is pinned in one place, constraints/cpu.txt; use another file with
# `make CONSTRAINTS=path/to/yours.txt ...` (for example to get a CUDA build).

PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints/cpu.txt
BIN := $(VENV)/bin
WORKERS ?= 2
DEMO_OUT ?= demo-output
DEMO_IMAGES_OUT ?= demo-images-output

.PHONY: demo demo-images test lint typecheck bench install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[all]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The demo first measures one worker (1 thread) so that the report can state the scaling
# efficiency against the ideal workers x per-worker throughput.
demo: $(VENV)/.installed
	@baseline=$$($(BIN)/distinfer bench --model minilm --input examples/kjv-verses.txt --rows 512 | head -1 | cut -d' ' -f1) && \
	echo "one worker x 1 thread: $$baseline rows/s" && \
	$(BIN)/distinfer run --model minilm --input examples/kjv-verses.txt \
		--output $(DEMO_OUT) --workers $(WORKERS) --threads-per-worker 1 --overwrite \
		--baseline-throughput $$baseline
	$(BIN)/python -c "import pyarrow.dataset as ds; t = ds.dataset('$(DEMO_OUT)').to_table(); \
		print(f'{t.num_rows} embeddings of width', t.schema.field('embedding').type.list_size, 'in $(DEMO_OUT)/')"

# Classifies the photographs bundled in examples/images/ (sources and licences in its
# LICENSES.md) with the built-in efficientnet-lite0 and prints each one's top ImageNet class.
demo-images: $(VENV)/.installed
	$(BIN)/distinfer run --model efficientnet-lite0 --input examples/images/ \
		--output $(DEMO_IMAGES_OUT) --workers $(WORKERS) --overwrite
	$(BIN)/python -c "import os, pyarrow.dataset as ds; t = ds.dataset('$(DEMO_IMAGES_OUT)').to_table().sort_by('path'); \
		[print(f'{os.path.relpath(p):36s} {l[0]} ({q[0]:.0%})') for p, l, q in \
		 zip(t['path'].to_pylist(), t['top5_labels'].to_pylist(), t['top5_probs'].to_pylist())]"

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check --no-cache src tests benchmarks

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest -q tests

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/batch_minilm.py
	$(BIN)/python benchmarks/scheduler_events.py
	$(BIN)/python benchmarks/ray_vs_raydata.py
	$(BIN)/python benchmarks/parallel_strategies.py
	$(BIN)/python benchmarks/serve_load.py
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/images.py
	$(BIN)/python benchmarks/keras_predict.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(DEMO_IMAGES_OUT) .pytest_cache .mypy_cache .ruff_cache
