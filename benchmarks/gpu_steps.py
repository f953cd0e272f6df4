"""The step table of ``benchmarks/gpu_check.py``: what one short GPU loan measures, and how.

Adding a benchmark to the GPU check is one ``Step`` entry here. A step whose script is not in the
tree yet is skipped with a line saying so, so entries for benchmarks still being written can sit
here before their scripts land. The caps are the check's time plan: every step runs under its own
cap, and the caps of all GPU steps together must fit ``BUDGET_S`` (a test holds them to it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# One H100 loan is 15 minutes of device time, the machine's start (several minutes) included:
# the whole check must finish in 8, and HARNESS_S of that goes to the check's own start and summary.
BUDGET_S = 480
HARNESS_S = 10


@dataclass(frozen=True, kw_only=True)
class Step:
    name: str  # results file stem: benchmarks/results/<name>-cuda.json
    script: str  # path from the repository root, or "pytest" for the GPU tests
    claim: str  # what the step checks, one line for the plan and the summary
    gpu: tuple[str, ...] | None  # arguments on the GPU; None: not run there (say why in skip_gpu)
    dry: tuple[str, ...] | None  # arguments of the CPU dry run at toy sizes; None: not dry-run
    cap_s: int  # wall-clock cap on the GPU, start-up and model building included
    dry_cap_s: int = 300  # only a guard against hangs: the dry run's time is not a GPU estimate
    json_flag: str = "--json"  # how the script is told where to write its JSON
    # Requirements beyond the device image, carried as wheels: a package the image lacks, or one whose
    # version there is too old ('transformers>=5.23'). Checked before the step runs.
    needs: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()  # programs the step runs, looked up on PATH
    skip_gpu: str = ""
    skip_dry: str = ""

    @property
    def benchmark(self) -> str:
        """The benchmark its JSON belongs to on the page (several steps may split one script's run)."""
        return "pytest_gpu" if self.script == "pytest" else Path(self.script).stem


STEPS: tuple[Step, ...] = (
    Step(name="pytest_gpu", script="pytest", claim="every test marked gpu passes on the device",
         gpu=(), dry=(), cap_s=40),
    # Split in two so that a slow attention sweep cannot cost the bandwidth kernels' results.
    Step(name="kernels", script="benchmarks/kernels.py",
         claim="fused attention vs eager and SDPA at AF2 (N_res 256-2048) and STDiT-XL/2 shapes, key-length sweep",
         gpu=("--device", "cuda", "--ops", "attention"), dry=("--device", "cpu", "--small", "--ops", "attention"),
         cap_s=60),
    Step(name="kernels_bandwidth", script="benchmarks/kernels.py",
         claim="fused softmax and LayerNorm against the measured copy bandwidth at AF2 and STDiT shapes",
         gpu=("--device", "cuda", "--ops", "softmax,layer_norm"),
         dry=("--device", "cpu", "--small", "--ops", "softmax,layer_norm"), cap_s=20),
    # Also two steps: the search runs forwards at 8-12k residues whose time is the least certain.
    Step(name="fastfold_inference", script="benchmarks/fastfold_inference.py",
         claim="AF2 inference eager vs default at N_res 1024 and 4096 (1 Evoformer + 1 extra-MSA block)",
         gpu=("--device", "cuda", "--n-res", "1024", "4096", "--blocks", "1", "--repeat", "1"),
         dry=("--device", "cpu", "--small", "--n-res", "16", "--blocks", "1"), cap_s=30),
    Step(name="fastfold_max_length", script="benchmarks/fastfold_inference.py",
         claim="the longest N_res AF2 inference runs in bf16 (doubling from 2048 to 12288, then to within 2048)",
         gpu=("--device", "cuda", "--n-res", "2048", "--blocks", "1", "--repeat", "1", "--find-max",
              "--max-n-res", "12288", "--step", "2048"),
         dry=None, skip_dry="--find-max needs CUDA; its search is checked by tests/test_gpu_check.py", cap_s=60),
    Step(name="gemini", script="benchmarks/gemini.py",
         claim="plain vs Gemini vs FSDP2-offload on GPT-2 350M and 1.3B: step time, TFLOP/s, MFU, peak memory",
         gpu=("--device", "cuda", "--sizes", "350M,1.3B", "--steps", "3"),
         dry=("--device", "cpu", "--small", "--sizes", "0.2M", "--steps", "2", "--seq", "32", "--batch", "1"),
         needs=("transformers>=5.23",), cap_s=65),  # the image's 5.17 lacks activation_checkpointing_enable
    Step(name="sd_finetune", script="benchmarks/sd_finetune.py", json_flag="--out",
         claim="SD-1.5 finetune at 512 px, batch 1: plain loop vs Gemini auto/offload; generation peak memory",
         gpu=("--device", "cuda", "--batches", "1", "--steps", "3"),
         dry=("--device", "cpu", "--small", "--batches", "1", "--steps", "1", "--threads", "1"),
         needs=("diffusers",), cap_s=70),
    Step(name="opensora_train", script="benchmarks/opensora_train.py", json_flag="--out",
         claim="STDiT-XL/2 training at 16 and 64 frames of 256x256: plain vs ferryman samples/s and peak memory",
         gpu=("--device", "cuda", "--repeat", "2", "--max-frames", "32"),
         dry=("--device", "cpu", "--small", "--repeat", "1", "--threads", "1"), cap_s=50),
    Step(name="host_adam", script="benchmarks/host_adam.py",
         claim="the host AdamW step of offloaded training on the GPU machine's CPU (16 and 64 Mi elements)",
         gpu=("--sizes", "16,64", "--repeat", "5"), dry=("--sizes", "1", "--repeat", "1", "--threads", "1"),
         cap_s=20),
    Step(name="fastfold_vs_af2", script="benchmarks/fastfold_vs_af2.py",
         claim="fastfold against AlphaFold2's own JAX code on the same GPU",
         gpu=None, dry=("--device", "cpu", "--n-res", "16", "--blocks", "1", "--repeat", "1", "--threads", "1"),
         cap_s=0, skip_gpu="AF2's XLA compile of the model alone takes more than this 8-minute check can spare: "
         "run `python benchmarks/fastfold_vs_af2.py --device cuda` on its own (N_res 128-2048)",
         needs=("alphafold-colabfold", "colabfold-kernels", "dm-haiku", "ml-collections", "dm-tree", "immutabledict")),
    Step(name="lm_finetune", script="benchmarks/lm_finetune.py",
         claim="Llama 125M and 760M finetuned within 4 GiB: plain vs Gemini auto vs FSDP2-offload (largest size, tokens/s)",
         gpu=("--device", "cuda", "--sizes", "125M,760M", "--budget-gib", "4", "--batch", "2", "--steps", "2",
              "--methods", "plain,gemini,fsdp2,deepspeed"),
         dry=("--device", "cpu", "--small", "--sizes", "0.3M,1.2M", "--steps", "2", "--threads", "1",
              "--methods", "plain,gemini,fsdp2"), cap_s=30),
    Step(name="fastfold_train", script="benchmarks/fastfold_train.py",
         claim="one AF2 training step at initial-training sizes, default vs eager",
         gpu=None, dry=None, cap_s=0,
         skip_gpu="not in issue #20's ladder: two full-depth points take minutes; run it alone on a longer loan",
         skip_dry="not part of the GPU check"),
    Step(name="msa_search", script="benchmarks/msa_search.py", tools=("jackhmmer", "mmseqs"),
         claim="MMseqs2 vs jackhmmer MSA search (CPU programs)",
         gpu=None, dry=None, cap_s=0,
         skip_gpu="a CPU benchmark of CPU programs (jackhmmer, MMseqs2), not installed on the device",
         skip_dry="not part of the GPU check"),
)  # fmt: skip
