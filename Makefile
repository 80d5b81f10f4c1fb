# `make demo` and `make test` do all set-up on a fresh machine.
# The virtual environment gets the first of these Pythons that runs and is a supported version
# (the pins of requirements.txt install on CPython 3.11 and 3.12 only, see pyproject.toml);
# `make PYTHON=/path/to/python3.12 install` chooses one.
PYTHON_VERSIONS := 3.11 3.12
PYTHON ?= $(addprefix python,$(PYTHON_VERSIONS)) python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The test files are spread over one pytest process per CPU (pytest-xdist; the tests of a file stay
# together, in order), each running PyTorch on one thread (TEST_THREADS, also in the subprocesses
# that tests start): on 2 cores 0.58x the time of one process on two threads. `make test
# PYTEST_ARGS=-q TEST_THREADS=` runs them in one process.
PYTEST_ARGS ?= -q -n auto --dist loadfile
TEST_THREADS ?= 1

.PHONY: install test demo lint clean-demo

$(PY):
	@py=; for candidate in $(PYTHON); do \
	    if "$$candidate" -c 'import sys; sys.exit("%d.%d" % sys.version_info[:2] not in "$(PYTHON_VERSIONS)".split())' 2>/dev/null; \
	    then py=$$candidate; break; fi; \
	done; \
	if [ -z "$$py" ]; then \
	    echo "error: no supported Python found. mask_former needs CPython $(subst $() , or ,$(PYTHON_VERSIONS)) (with venv);" >&2; \
	    echo "tried: $(PYTHON). Install one, or name it: make PYTHON=/path/to/python3.11 $(MAKECMDGOALS)" >&2; \
	    exit 1; \
	fi; \
	echo "$(PY): creating with $$py ($$("$$py" --version 2>&1))"; \
	"$$py" -m venv $(VENV)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml setup.py scripts/install_detectron2.sh | $(PY)
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt
	bash scripts/install_detectron2.sh $(PY)
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

test: install
	$(if $(TEST_THREADS),OMP_NUM_THREADS=$(TEST_THREADS) )$(PY) -m pytest $(PYTEST_ARGS) tests

# `make demo DEMO_MODELS="maskformer panoptic_segformer"` trains and compares both model families
# (about twice the time of the default).
DEMO_MODELS ?= maskformer
demo: install
	$(PY) tools/run_demo.py --output output/demo --models $(DEMO_MODELS)

# ruff's settings are in pyproject.toml
lint: install
	$(VENV)/bin/ruff check .

clean-demo:
	rm -rf output/demo
