# kiln: `make demo` and `make test` work on a fresh machine (they set up .venv first).
# .[test] pulls the optional extras the tests use (torch, xgboost); users install kiln,
# kiln[torch] (PyTorch frontend) or kiln[tune] (MetaSchedule tuning) as they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kiln-installed

.PHONY: setup demo test test-all test-edge lint bench tune clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e ".[test]"
	@# optional: the arm64 cross toolchain via apt-get (it says what it installs; it skips,
	@# with a message, without root or with KILN_NO_APT=1)
	bash tools/edge/install_cross.sh
	@# optional: Debian's chromium, for the headless report.html test (same rules)
	bash tools/install_chromium.sh
	touch $(STAMP)

demo: setup
	$(VENV)/bin/kiln compile compiler/core/examples/tiny_cnn.onnx --spec reparam --target host -o .kiln-demo --no-cache

test: setup
	$(PY) -m pytest -q -n 2 --durations=15

# ruff (with banned APIs: tvm only in backends/tvm, onnxruntime only in backends/ort),
# import-linter's layer contracts (pyproject.toml) and mypy on the core.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	MYPY=$(VENV)/bin/mypy bash tools/mypy_core.sh

test-all: setup
	KILN_SLOW=1 $(PY) -m pytest -q -n 2 --durations=25

# Build arm64 artifacts (fp32 CNN, int4 weight-only model), run them under qemu in a debootstrapped arm64 rootfs, compare
# with the host build (measured: 84 s cold, 12-15 s with ~/.cache/kiln-edge filled).
test-edge: setup
	bash tools/edge/edge_check.sh

bench: setup
	$(PY) -m bench --json bench/results.json

# Regenerate the shipped tuning database for this machine's target (slow: tens of
# minutes), then drop records kiln's own rules now beat. See backends/tvm/tuning_db/README.md.
tune: setup
	$(PY) -m bench.tune --trials 160
	$(PY) -m bench.tune --recheck

clean:
	rm -rf $(VENV) .kiln-demo .lint build *.egg-info
