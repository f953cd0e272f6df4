# Two commands do all set-up on a fresh machine:
#   make test   install everything, then lint and run the test suite
#   make demo   install everything, then run the main jobs on the shipped sample data
# torch is installed first, pinned, so that no other requirement can pull a different build.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ferryman-installed
TORCH_SPEC ?= torch==2.13.0
DEBIAN_TOOLS := hmmer hhsuite kalign
DEMO_OUT ?= demo-out

.PHONY: install tools test lint demo clean

install: $(STAMP) tools

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Ferryman needs Python >= 3.11; found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[all,dev]"
	@touch $(STAMP)

# jackhmmer/hmmsearch (hmmer), hhblits/hhsearch (hhsuite) and kalign come from Debian's packages.
tools:
	@missing=""; \
	for bin in jackhmmer hmmsearch hhblits hhsearch kalign; do command -v $$bin >/dev/null || missing="$$missing $$bin"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian packages $(DEBIAN_TOOLS) for:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_TOOLS) >/dev/null; \
	else \
	  echo "NOTE: missing$$missing. Install them with: sudo apt-get install $(DEBIAN_TOOLS)"; \
	  echo "      (fastfold then runs single-sequence or with --msa-dir; tests that need them are skipped)"; \
	fi

lint: install
	$(VENV)/bin/ruff check ferryman tests benchmarks

test: install lint
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/ferryman env
	$(VENV)/bin/fastfold --help
	$(VENV)/bin/opensora --help
	$(VENV)/bin/sd-finetune --help
	@echo "demo outputs are in $(DEMO_OUT)/"

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache *.egg-info
