# megalm: the two commands a new user runs are `make train` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU machines get the CPU wheel of torch 2.13.0; on a GPU machine pip takes the CUDA build.
TORCH  ?= torch==2.13.0
DATA   := data/stdlib
# DeepSpeed JIT-builds a CPU comm op; keep its build cache inside the venv (built once).
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
CONFIG ?= configs/tiny.yaml
ARGS   ?=

.PHONY: help install install-dev data train test golden lint bench compare-lstm clean-run clean

help:
	@echo "make train   install, build the stdlib corpus + tokenizer + shards, train configs/tiny.yaml"
	@echo "make test    install dev extras and run the whole test suite"
	@echo "make data    only build data/stdlib (corpus, tokenizer, shards)"
	@echo "make golden  regenerate tests/golden/*.json (golden loss curves) and print the diff"
	@echo "make lint    ruff check + format check"
	@echo "make bench   megalm step vs bare PyTorch step benchmark"
	@echo "make compare-lstm  train the article's LSTM and the default Transformer on the same tokens, plot both"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	$(BIN)/python -c "from megalm.train.ds_ops import build_comm_op; print(build_comm_op())"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(DATA)/shards/manifest.json: | $(VENV)/.installed
	$(BIN)/python -m data_tools.stdlib_corpus --output $(DATA)/raw
	$(BIN)/python -m data_tools.train_tokenizer --input $(DATA)/raw --vocab-size 4096 --output $(DATA)/tokenizer
	$(BIN)/python -m data_tools.preprocess --input $(DATA)/raw --tokenizer $(DATA)/tokenizer \
		--output $(DATA)/shards --val-fraction 0.05 --workers 2

data: $(DATA)/shards/manifest.json

train: $(VENV)/.installed data
	$(BIN)/python launch/pretrain.py --config $(CONFIG) $(ARGS)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# After a change that moves the numbers on purpose (or a torch/DeepSpeed upgrade): review the
# printed diff and commit tests/golden/*.json with the change.
golden: $(VENV)/.installed-dev
	$(BIN)/python -m tests.golden

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(VENV)/.installed data
	$(BIN)/python launch/bench_step.py --config $(CONFIG) $(ARGS)

compare-lstm: $(VENV)/.installed data
	$(BIN)/python launch/compare_lstm.py --config $(CONFIG) $(ARGS)

clean-run:
	rm -rf runs/tiny

clean:
	rm -rf $(VENV) data runs
