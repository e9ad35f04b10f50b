# Every target creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build on CI and laptops; on a GPU machine use e.g. TORCH_SPEC="torch==2.13.0" with your CUDA index
# (the lock's torch line admits any local build of its version: 2.13.0+cpu, 2.13.0+cu128).
TORCH_SPEC ?= torch==2.13.0
# The exact versions the suite last passed with: every install here takes them (make lock renews them)
LOCK := constraints.txt
# make test-latest and make lock resolve the newest releases here, away from $(VENV)
LATEST ?= .venv-latest

.PHONY: install lint format test test-fast test-latest lock demo bench clean

# $(1): the venv; $(2): the constraints (none: the newest releases), which also pin the setuptools that builds
# our editable install (the venv's first pip predates --build-constraint)
define make_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install -q --upgrade $(if $(2),-c $(2)) pip
	$(1)/bin/pip install -q $(if $(2),-c $(2)) "$(TORCH_SPEC)"
	$(1)/bin/pip install -q $(if $(2),-c $(2) --build-constraint $(2)) -e ".[test,demo]"
endef

$(VENV)/.installed: setup.py $(LOCK)
	$(call make_venv,$(VENV),$(LOCK))
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

# the formatter (line length 100, ruff.toml) over the tree: make lint refuses unformatted code
format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# two pytest-xdist workers, a test file each: most tests wait on the processes they start
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=30

# The quick lane while developing: the suite without the tests marked slow (multi-process training, launchers,
# kernels in the interpreter). make test stays the whole suite.
test-fast: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

# The suite on the newest releases of everything, in a scratch venv: drift found on purpose. The one test left out
# is the one that holds an environment to the lock, which this one is not.
test-latest:
	rm -rf $(LATEST)
	$(call make_venv,$(LATEST),)
	$(LATEST)/bin/python -m pytest -q -n 2 --dist loadfile \
		--deselect tests/test_image.py::test_the_environment_is_the_lock

# Renew the lock: make test-latest, and only when it passes, its versions become constraints.txt.
lock: test-latest
	{ sed -n '/^#/p' $(LOCK); $(LATEST)/bin/pip freeze --all --exclude-editable \
		| sed -E 's/^(torch==[^+]*)[+].*/\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

demo: install
	$(BIN)/python -m megatron_glm.demo --workdir demo_out

bench: install
	$(BIN)/python benchmarks/preprocess.py --mb 200

clean:
	rm -rf $(VENV) $(LATEST) demo_out build *.egg-info .pytest_cache .hypothesis
