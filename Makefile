# Two commands do all set-up on a fresh machine:
#   make test   install everything (and the parity oracle), then lint and run the test suite
#   make demo   install everything, then run the main jobs on the shipped sample data
# torch is installed first, pinned, so that no other requirement can pull a different build.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ferryman-installed
PARITY_STAMP := $(VENV)/.ferryman-parity-installed
TORCH_SPEC ?= torch==2.13.0
DEBIAN_TOOLS := hmmer hhsuite kalign
DEMO_OUT ?= demo-out

.PHONY: install tools test parity lint demo clean

install: $(STAMP) tools

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Ferryman needs Python >= 3.11; found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[all,dev]"
	@touch $(STAMP)

# AlphaFold2's JAX code (the parity extra), the oracle of tests/apps/fastfold/parity: installed for
# the tests only, never by `make install` or a user's `pip install ferryman`.
$(PARITY_STAMP): $(STAMP)
	$(PY) -m pip install -e ".[parity]"
	@touch $(PARITY_STAMP)

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

test: install lint $(PARITY_STAMP)
	$(PY) -m pytest -q

# Only the AlphaFold2 parity suite (a part of `make test`).
parity: install $(PARITY_STAMP)
	$(PY) -m pytest -q -m parity tests/apps/fastfold/parity

demo: install
	rm -rf $(DEMO_OUT)
	$(VENV)/bin/ferryman env
	$(VENV)/bin/fastfold --help
	$(VENV)/bin/opensora --help
	$(VENV)/bin/sd-finetune --help
	@echo "== fastfold: a small random model, real jackhmmer MSAs against data/fastfold/seqdb, Amber relax of the best model"
	$(VENV)/bin/fastfold predict data/fastfold/sample.fasta --random-weights --uniref90-db data/fastfold/seqdb/globins45.fa \
	  --models-to-relax best --out $(DEMO_OUT)/fastfold
	@echo "== fastfold train: the debug preset, 10 steps on the villin headpiece structure OpenMM ships (metrics.jsonl, loss.png, lddt.png)"
	mkdir -p $(DEMO_OUT)/fastfold-train/data
	cp "$$($(PY) -c 'import openmm.app, pathlib; print(pathlib.Path(openmm.app.__file__).parent / "data" / "test.pdb")')" \
	  $(DEMO_OUT)/fastfold-train/data/villin.pdb
	$(VENV)/bin/fastfold train --data $(DEMO_OUT)/fastfold-train/data --out $(DEMO_OUT)/fastfold-train/run \
	  --preset debug --steps 10 --crop-size 32
	@echo "== sd-finetune: a tiny Stable Diffusion pipeline built from config, finetuned on data/diffusion"
	$(PY) -m ferryman.apps.diffusion.presets --preset tiny --out $(DEMO_OUT)/sd-tiny
	$(VENV)/bin/sd-finetune --model $(DEMO_OUT)/sd-tiny --data data/diffusion --out $(DEMO_OUT)/sd-finetune \
	  --resolution 32 --center-crop --max-steps 30 --batch-size 4 --lr 1e-3 --checkpoint-every 15 \
	  --validation-prompt "a red circle on a blue background" --validation-every 15 --set validation_inference_steps=5
	$(VENV)/bin/sd-generate --model $(DEMO_OUT)/sd-finetune --prompt "a red circle on a blue background" \
	  --height 32 --width 32 --steps 10 --out $(DEMO_OUT)/sd-generate
	@echo "== opensora: tiny T5 and VAE folders built from config, a debug STDiT trained on data/opensora, one sample"
	$(PY) -m ferryman.apps.opensora.tiny --out $(DEMO_OUT)/opensora/tiny
	$(VENV)/bin/opensora data check data/opensora/clips.csv --bucket 32:8:2 --set data.size_multiple=8
	$(VENV)/bin/opensora train --csv data/opensora/clips.csv --text-encoder $(DEMO_OUT)/opensora/tiny/t5 \
	  --vae $(DEMO_OUT)/opensora/tiny/vae --preset debug --bucket 32:8:2 --set data.size_multiple=8 --steps 20 \
	  --precision fp32 --lr 1e-3 --out $(DEMO_OUT)/opensora/run
	$(VENV)/bin/opensora sample --ckpt $(DEMO_OUT)/opensora/run --prompt "a red circle moving right on a blue background" \
	  --num-frames 8 --resolution 24x40 --steps 10 --out $(DEMO_OUT)/opensora/sample.mp4
	@echo "demo outputs are in $(DEMO_OUT)/"

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache *.egg-info
