# make demo: train the bundled demo (data/reviews.txt.gz) on CPU in a few minutes.
# make test: run the whole test suite. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test clean

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt -r requirements-test.txt
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python train.py --out out/demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf out data/prepared
