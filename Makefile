# make demo | make test | make lint: each creates .venv (python3 -m venv) when it is missing
# and installs the package into it, editable, with the extras it needs. Installing again is
# skipped until pyproject.toml changes (one stamp file per set of extras, inside .venv).
# TensorFlow comes from the extra TF names: `cpu` (tensorflow-cpu) by default, `make test
# TF=gpu` for the CUDA build.

PYTHON      ?= python3
PYTEST_ARGS ?= -n 2 --dist worksteal -q --durations=25
VENV        := .venv
BIN         := $(VENV)/bin
TF          ?= cpu
comma       := ,

.PHONY: demo test lint bench clean-venv

# The picture goes to out/ (ignored by git) rather than the default ./gradsplit-demo.png.
demo: $(VENV)/.installed-$(TF)-render
	@mkdir -p out
	$(BIN)/gradsplit demo -o out/gradsplit-demo.png

test: $(VENV)/.installed-$(TF)-test-render
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Figures of BENCHMARKS.md and docs/bench_cut_size.png; takes ~25 minutes on 2 cores.
bench: $(VENV)/.installed-$(TF)-render
	$(BIN)/python tools/bench.py

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# .installed-cpu-test-render installs ".[cpu,test,render]", and so on.
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[$(subst -,$(comma),$*)]"
	touch $@

clean-venv:
	rm -rf $(VENV)
