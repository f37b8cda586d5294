# Two commands do all set-up on a fresh machine:
#   make demo   - simulated federation of 3 synthetic hospitals with DP, report in runs/demo/
#   make test   - the default test suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# torch goes in first, pinned: an unpinned torch (or a package pulling one) fetches a multi-GB build.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# Two test workers, each test file on one of them (its module fixtures built once): the deployed-site
# tests mostly wait on Flower's polling, so the other worker trains meanwhile. --durations names the
# slowest tests in the log. TEST_ARGS= runs in one process.
TEST_ARGS ?= -n 2 --dist loadfile --durations=15

.PHONY: demo test lint install clean flwr-run

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[dev,tracking]'
	touch $@

demo: install
	$(BIN)/medfed simulate configs/classification-synthetic.toml --out runs/demo

# pytest exits 5 when it collects no test: treat that as a failure, never as a pass.
test: install
	$(BIN)/pytest $(TEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "no tests were collected"; exit 1; fi; exit $$status

# The same Flower app run the Flower-native way (`flwr run .`) on a local simulation SuperLink.
flwr-run: install
	deploy/flwr-local-simulation.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy medfed server client

clean:
	rm -rf $(VENV) runs
