# Every target creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build on CI and laptops; on a GPU machine use e.g. TORCH_SPEC="torch==2.13.0" with your CUDA index.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install lint test demo bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,demo]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

# two pytest-xdist workers, a test file each: most tests wait on the processes they start
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

demo: install
	$(BIN)/python -m megatron_glm.demo --workdir demo_out

bench: install
	$(BIN)/python benchmarks/preprocess.py --mb 200

clean:
	rm -rf $(VENV) demo_out build *.egg-info .pytest_cache .hypothesis
