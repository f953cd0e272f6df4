"""`ferryman finetune` and `ferryman generate` (click). Heavy imports happen inside the commands."""

from __future__ import annotations

import click

from ferryman.core.cli import (
    FerrymanCommand,
    FerrymanGroup,
    config_options,
    resolve_config,
    train_flags,
    train_options,
)

# The app's own flags -> FinetuneConfig keys. The shared training flags (--max-steps,
# --checkpoint-every, --resume, --memory, --precision, --grad-accum, --lr) come from
# core.cli.train_options and land on the embedded core TrainConfig, ``train``.
FINETUNE_FLAGS = {
    "model": "model", "data": "data.path", "out": "train.out_dir", "eval_data": "data.eval_path",
    "eval_fraction": "data.eval_fraction", "eval_every": "eval_every", "seq_len": "data.seq_len",
    "batch_size": "batch_size", "text_field": "data.text_field", "train_on_prompt": "data.train_on_prompt",
    "gradient_checkpointing": "gradient_checkpointing", "lora_rank": "lora.rank", "lora_alpha": "lora.alpha",
    "lora_targets": "lora.targets", "lr_schedule": "train.schedule", "warmup_steps": "train.warmup_steps",
    "seed": "train.seed", "device": "train.device", "save_dtype": "save_dtype",
}


@click.command(cls=FerrymanCommand, context_settings={"show_default": True})
@click.option("--model", help="Causal LM folder transformers loads (OPT, GPT-2, Llama, Qwen, Mistral ...), safetensors weights.")
@click.option("--data", help="Training text: .txt, .jsonl ('text', or 'prompt' and 'completion'), .parquet, or a folder of them.")
@click.option("--out", help="Output folder: the finetuned model, checkpoints/, metrics, loss curves, config.yaml.")
@click.option("--eval-data", help="Held-out text for the evaluation loss (default: --eval-fraction of --data).")
@click.option("--eval-fraction", type=float, help="Share of the packed blocks held out when --eval-data is not given (0: none).")
@click.option("--eval-every", type=int, help="Held-out loss and perplexity every N updates (0: at the end only).")
@click.option("--seq-len", type=int, help="Tokens per packed training block.")
@click.option("--batch-size", type=int, help="Blocks per process and micro-batch (one update: x --grad-accum x processes).")
@click.option("--text-field", help="The text field of .jsonl lines and parquet columns.")
@click.option("--train-on-prompt/--completion-only", default=None,
              help="prompt/completion data: also learn the prompts (default: the loss covers completions only).")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help="Recompute activations in backward instead of keeping them.")
@click.option("--lora-rank", type=int, help="Train LoRA adapters of this rank instead of every weight (0: off).")
@click.option("--lora-alpha", type=float, help="LoRA alpha: adapters scaled by alpha / rank (default: twice the rank).")
@click.option("--lora-targets", help="Modules that get adapters: all-linear, or names such as q_proj,v_proj.")
@click.option("--lr-schedule", type=click.Choice(["cosine", "constant"]), help="After the warm-up (train.schedule).")
@click.option("--warmup-steps", type=int, help="Linear warm-up steps (train.warmup_steps).")
@click.option("--save-dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              help="Weights of the output (auto: the dtype the base model was published in).")
@click.option("--seed", type=int, help="train.seed: initial adapters, data order, held-out split.")
@click.option("--device", help="auto, cpu, cuda or cuda:N (train.device; under torchrun each process's own GPU).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@train_options(precisions=("fp32", "bf16"))
def finetune(config_file, overrides, no_progress, **flags) -> None:
    """Finetune a Hugging Face causal language model on text.

    Writes a model folder to --out that AutoModelForCausalLM.from_pretrained loads (with
    --lora-rank: adapters that peft's PeftModel.from_pretrained loads onto the base), plus
    checkpoints/ (--resume latest continues from the newest), metrics.jsonl, loss.png, eval.jsonl
    with the held-out loss and perplexity, and config.yaml, which --config takes back. --memory
    gemini-auto trains models larger than the GPU (weights, gradients and AdamW state in chunks
    moved between GPU and host as the memory needs); gemini-offload keeps them all on the host.
    --set reaches any field, the core loop's under train (e.g. --set train.optim.weight_decay=0.1).
    The optimizer is AdamW (weight_decay=0 gives Adam); biases and norms get no weight decay.

    \b
    Examples:
      ferryman finetune --model opt-1.3b/ --data notes.txt --out runs/opt --seq-len 1024 --max-steps 500
      ferryman finetune --model llama/ --data chat.jsonl --out runs/lora --lora-rank 16 --lr 2e-4
      ferryman finetune --model llama-8b/ --data corpus/ --out runs/big --memory gemini-auto \\
                        --gradient-checkpointing --batch-size 4 --grad-accum 8
      ferryman finetune --config runs/opt/config.yaml --set train.max_steps=1000 --resume latest
      torchrun --nproc-per-node 8 -m ferryman.cli finetune --model llama/ --data corpus/ --out runs/dp \\
                        --memory gemini-auto
    """
    from ferryman.apps.lm.config import FinetuneConfig
    from ferryman.apps.lm.train import finetune as run

    dotted = train_flags(flags, prefix="train.")
    dotted |= {FINETUNE_FLAGS[name]: value for name, value in flags.items()}
    cfg = resolve_config(FinetuneConfig(), config_file=config_file, flags=dotted, overrides=overrides)
    result = run(cfg, progress=not no_progress)
    if not result.is_main:  # under torchrun, rank 0 reports
        return
    click.echo(f"data: {result.summary}")
    if result.losses:
        tail = result.losses[-min(10, len(result.losses)):]
        click.echo(f"trained {len(result.losses)} updates; mean loss of the last {len(tail)}: {sum(tail) / len(tail):.4f}")
    if result.evals:
        last = result.evals[-1]
        click.echo(f"held-out loss {last['eval_loss']:.4f}, perplexity {last['perplexity']:.2f} "
                   f"({last['eval_tokens']} tokens)")
    click.echo(f"wrote {result.out}")


GENERATE_FLAGS = {"model": "model", "base": "base", "max_new_tokens": "max_new_tokens", "temperature": "temperature",
                  "top_p": "top_p", "precision": "precision", "device": "device", "seed": "seed"}


@click.command(cls=FerrymanCommand, context_settings={"show_default": True})
@click.option("--model", help="A finetune output, any causal LM folder, or a LoRA adapter folder.")
@click.option("--prompt", "prompts", multiple=True, help="Text to continue (repeatable).")
@click.option("--base", help="LoRA: the base model folder (default: the one the adapter names).")
@click.option("--max-new-tokens", type=int)
@click.option("--temperature", type=float, help="0: greedy decoding.")
@click.option("--top-p", type=float, help="Nucleus sampling (with --temperature above 0).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]))
@click.option("--device", help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int)
@config_options
def generate(config_file, overrides, prompts, **flags) -> None:
    """Continue prompts with a causal language model: a quick look at a finetuned one.

    \b
    Examples:
      ferryman generate --model runs/opt --prompt "The ferryman said"
      ferryman generate --model runs/lora --prompt "Q: what is 2 + 3?" --max-new-tokens 16
      ferryman generate --model runs/opt --prompt "Once" --temperature 0.8 --top-p 0.9 --seed 1
    """
    from ferryman.apps.lm.config import GenerateConfig
    from ferryman.apps.lm.generate import generate as run

    dotted = {GENERATE_FLAGS[name]: value for name, value in flags.items()}
    if prompts:
        dotted["prompts"] = list(prompts)
    cfg = resolve_config(GenerateConfig(), config_file=config_file, flags=dotted, overrides=overrides)
    for prompt, text in zip(cfg.prompts, run(cfg)):
        click.echo(prompt + text)


@click.group(cls=FerrymanGroup)
def main() -> None:
    """finetune and generate as subcommands, for `torchrun -m ferryman.apps.lm.cli finetune ...`."""


main.add_command(finetune, "finetune")
main.add_command(generate, "generate")

if __name__ == "__main__":
    main()
