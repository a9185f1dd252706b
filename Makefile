# make demo: train the bundled demo (data/reviews.txt.gz) on CPU in a few minutes (installs torch and numpy only).
# make test: run the whole test suite (also installs pytest, scikit-learn and triton). make bench: tools/bench.py's
# demo-size table. All create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean

# What is installed is said first (pip -q is otherwise silent for minutes): the requirement lines of each file.
SAY = @echo "make: installing into $(VENV) (a few minutes the first time): $$(grep -hv '^\s*\#' $(1) | xargs)"

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(call SAY,requirements.txt)
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(call SAY,requirements-test.txt)
	$(BIN)/pip install -q -r requirements.txt -r requirements-test.txt
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python train.py --out out/demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q tests

bench: $(VENV)/.installed
	$(BIN)/python tools/bench.py

clean:
	rm -rf out data/prepared
