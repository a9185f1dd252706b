# make demo: train the bundled demo (data/reviews.txt.gz) on CPU in a few minutes.
# make test: run the whole test suite. make bench: bench.py's demo-size table. All create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt -r requirements-test.txt
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python train.py --out out/demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q tests

bench: $(VENV)/.installed
	$(BIN)/python bench.py

clean:
	rm -rf out data/prepared
