# Two commands do all set-up on a fresh machine:
#   make test   install everything (AlphaFold2's JAX code, the parity oracle, included), then lint and test
#   make demo   install everything, then run the main jobs on the shipped sample data
# Both install the exact tested set pinned in requirements.lock (torch included, as the CPU build
# of torch==2.13.0). `make lock` re-resolves the lock from pyproject's ranges; `make test-latest`
# runs the suite on the newest versions those ranges allow, in .venv-latest, to show drift early.

SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ferryman-installed
LOCK   := requirements.lock
EXTRAS := --extra all --extra dev --extra parity
UV_VERSION := 0.13.9
# Where the CPU build of torch comes from: this machine's wheel folder, else PyTorch's CPU index.
TORCH_SOURCE ?= $(if $(wildcard /opt/wheels/torch-2.13.0*),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)
LOCK_ARGS = pyproject.toml $(EXTRAS) -c requirements-torch.txt --python-version 3.11 --python-platform x86_64-manylinux_2_34
DEBIAN_TOOLS := hmmer hhsuite kalign mmseqs2
DEMO_OUT ?= demo-out
LATEST := .venv-latest

.PHONY: install tools test parity lint demo clean lock test-latest mutation

install: $(STAMP) tools

$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "The lock is resolved for Python 3.11; found " + sys.version.split()[0] + ". Without the lock: pip install -e .[all] (see README)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH_SOURCE) -r $(LOCK)
	$(PY) -m pip install --no-deps -e .
	@touch $(STAMP)

# uv (which writes the lock) lives in its own small venv, so `make lock` works before .venv exists.
UV := .venv-uv/bin/uv
$(UV):
	$(PYTHON) -m venv .venv-uv && .venv-uv/bin/python -m pip install -q "uv==$(UV_VERSION)"

# Re-resolve the lock from pyproject's ranges. Versions already in the lock are kept when they
# still satisfy the ranges, so with nothing changed the file comes back byte for byte.
lock: $(UV)
	$(UV) pip compile $(LOCK_ARGS) $(TORCH_SOURCE) -o $(LOCK)

# The newest versions pyproject allows, in a separate venv; prints what moved, then runs the suite.
test-latest: $(UV)
	rm -rf $(LATEST) && $(PYTHON) -m venv $(LATEST)
	$(UV) pip compile $(LOCK_ARGS) $(TORCH_SOURCE) --upgrade --no-header -o $(LATEST)/latest.txt
	@moved="$$(diff <(grep -E '^[A-Za-z0-9]' $(LOCK)) <(grep -E '^[A-Za-z0-9]' $(LATEST)/latest.txt) | grep '^>' | sed 's/^> /   /')"; \
	echo "== versions newer than requirements.lock:"; echo "$${moved:-   (none: the lock is the newest set pyproject allows)}"; \
	echo "== key versions used:"; grep -E '^(torch|triton|transformers|peft|diffusers|numpy|jax|alphafold-colabfold|openmm)==' $(LATEST)/latest.txt | sed 's/^/   /'
	$(LATEST)/bin/python -m pip install $(TORCH_SOURCE) -r $(LATEST)/latest.txt
	$(LATEST)/bin/python -m pip install --no-deps -e .
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider

# jackhmmer/hmmsearch (hmmer), hhblits/hhsearch (hhsuite), kalign and mmseqs (mmseqs2) come from Debian's packages.
tools:
	@missing=""; \
	for bin in jackhmmer hmmsearch hhblits hhsearch kalign mmseqs; do command -v $$bin >/dev/null || missing="$$missing $$bin"; done; \
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

# Only the AlphaFold2 parity suite (a part of `make test`).
parity: install
	$(PY) -m pytest -v -m parity tests/apps/fastfold/parity

# Mutation testing (docs/testing.md; not part of CI: hours on 2 cores). MODULES picks groups of
# pyproject's [tool.mutmut.groups], e.g. `make mutation MODULES="core/gemini fastfold/loss"`;
# MUTATION_ARGS passes --retest (survivors again, after adding tests) or --update-docs.
# One mutmut worker under nice, so that it takes the spare CPU and no more.
MODULES ?=
MUTATION_ARGS ?=
mutation: install
	nice -n 10 $(PY) tests/mutation.py $(MODULES) $(MUTATION_ARGS)

demo: install
	rm -rf $(DEMO_OUT)
	$(VENV)/bin/ferryman env
	$(VENV)/bin/fastfold --help
	$(VENV)/bin/opensora --help
	$(VENV)/bin/sd-finetune --help
	@echo "== fastfold: a small random model, real jackhmmer MSAs against data/fastfold/seqdb, Amber relax of the best model"
	$(VENV)/bin/fastfold predict data/fastfold/sample.fasta --random-weights --msa-mode jackhmmer \
	  --uniref90-db data/fastfold/seqdb/globins45.fa --models-to-relax best --out $(DEMO_OUT)/fastfold
	@echo "== fastfold msa: ColabFold's MMseqs2 search on a database built from data/fastfold/seqdb, then predict from it"
	$(PY) -c 'from pathlib import Path; from ferryman.apps.fastfold.data.mmseqs import build_database; \
	  build_database(Path("data/fastfold/seqdb/globins45.fa"), Path("$(DEMO_OUT)/colabfold_dbs/uniref30_2302_db"))'
	$(VENV)/bin/fastfold msa data/fastfold/hbb_human.fasta --msa-mode mmseqs2 --mmseqs-db-dir $(DEMO_OUT)/colabfold_dbs \
	  --mmseqs-env-db "" --out $(DEMO_OUT)/fastfold-mmseqs
	$(VENV)/bin/fastfold predict data/fastfold/hbb_human.fasta --random-weights --use-precomputed-msas --no-relax \
	  --out $(DEMO_OUT)/fastfold-mmseqs
	@echo "== fastfold train: the debug preset, 10 steps on the villin headpiece structure OpenMM ships (metrics.jsonl, loss.png, lddt.png)"
	mkdir -p $(DEMO_OUT)/fastfold-train/data
	cp "$$($(PY) -c 'import openmm.app, pathlib; print(pathlib.Path(openmm.app.__file__).parent / "data" / "test.pdb")')" \
	  $(DEMO_OUT)/fastfold-train/data/villin.pdb
	$(VENV)/bin/fastfold train --data $(DEMO_OUT)/fastfold-train/data --out $(DEMO_OUT)/fastfold-train/run \
	  --preset debug --max-steps 10 --checkpoint-every 5 --crop-size 32
	@echo "== fastfold predict with the weights that run trained (its model preset is read from the run)"
	$(VENV)/bin/fastfold predict data/fastfold/villin.fasta --params $(DEMO_OUT)/fastfold-train/run \
	  --msa-mode single-sequence --no-relax --out $(DEMO_OUT)/fastfold-trained
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
	  --vae $(DEMO_OUT)/opensora/tiny/vae --preset debug --bucket 32:8:2 --set data.size_multiple=8 --max-steps 20 \
	  --precision fp32 --lr 1e-3 --out $(DEMO_OUT)/opensora/run
	$(VENV)/bin/opensora sample --ckpt $(DEMO_OUT)/opensora/run --prompt "a red circle moving right on a blue background" \
	  --num-frames 8 --resolution 24x40 --steps 10 --out $(DEMO_OUT)/opensora/sample.mp4
	@echo "== ferryman finetune: a tiny random Llama finetuned on sums, then asked one"
	$(PY) -m ferryman.apps.lm.tiny --family llama --out $(DEMO_OUT)/lm-tiny --data $(DEMO_OUT)/lm-data
	$(VENV)/bin/ferryman finetune --model $(DEMO_OUT)/lm-tiny --data $(DEMO_OUT)/lm-data/sums.txt --out $(DEMO_OUT)/lm-run \
	  --seq-len 64 --batch-size 4 --max-steps 20 --lr 3e-3 --eval-every 10 --memory gemini-auto
	$(VENV)/bin/ferryman generate --model $(DEMO_OUT)/lm-run --prompt "3 plus 4 is" --max-new-tokens 8
	@echo "demo outputs are in $(DEMO_OUT)/"

clean:
	rm -rf $(VENV) $(LATEST) .venv-uv $(DEMO_OUT) .pytest_cache .ruff_cache *.egg-info

# The GPU check (benchmarks/gpu_check.py; docs/benchmarks.md, "The GPU check"). gpu-check runs on a
# lent GPU machine, whose own python3 holds torch (no .venv there); gpu-wheels fetches, here, the
# Python 3.12 wheels of what that machine lacks into .whl/ (carried with the call); gpu-check-dry is
# the same steps on CPU at toy sizes (tests/test_gpu_check.py runs it in make test); bench-report
# regenerates docs/benchmarks.md from benchmarks/results/*.json.
GPU_CHECK_OUT ?= benchmarks/results/gpu-check
WHEEL_PLATFORMS := $(foreach n,17 24 27 28 31 34 35,--platform manylinux_2_$(n)_x86_64) \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64
WHEELS_MAX_MIB := 60

.PHONY: gpu-check gpu-check-dry gpu-wheels bench-report

gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

gpu-check-dry: install
	$(PY) benchmarks/gpu_check.py --dry-run

gpu-wheels: install
	rm -rf .whl && mkdir -p .whl
	$(PY) benchmarks/gpu_check.py --wheel-specs > .whl/specs.txt
	while read -r spec; do \
	  $(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    $(WHEEL_PLATFORMS) -d .whl "$$spec" || exit 1; \
	done < .whl/specs.txt
	@mib=$$(du -sm .whl | cut -f1); echo ".whl: $$(ls .whl/*.whl | wc -l) wheels, $$mib MiB (carry it: see docs/benchmarks.md)"; \
	  [ $$mib -le $(WHEELS_MAX_MIB) ] || { echo "Error: .whl is over $(WHEELS_MAX_MIB) MiB; the device call carries 64 MiB in all"; exit 1; }

bench-report: install
	$(PY) benchmarks/report.py
