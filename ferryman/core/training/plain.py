"""The plain engine: the whole model on one device, torch fused AdamW, autocast (the ``Engine`` protocol)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from ferryman.core import pretrained
from ferryman.core.errors import UserError
from ferryman.core.gemini.lazy import materialize
from ferryman.core.io import atomic_path, write_text
from ferryman.core.optim import OptimConfig, TrainableState
from ferryman.core.parallel import ParallelDims
from ferryman.core.parallel.grads import reduce_partial_grads


class PlainEngine:
    """Mixed-precision AdamW training of a model that fits on the device (the baseline Gemini beats).

    Implements ``training.engine.Engine`` like ``GeminiEngine``. Data parallel through
    DistributedDataParallel; every rank holds the same state and rank 0 writes it.
    """

    kind = "plain"

    def __init__(
        self, module: nn.Module, ocfg: OptimConfig, dtype: torch.dtype, device: torch.device, dims: ParallelDims | None = None
    ) -> None:
        self.ocfg, self.dtype, self.device = ocfg, dtype, device
        materialize(module, device)  # weights left in files (gemini/lazy.py) go straight to the device
        self.module = module.to(device)
        self.rank = dims.rank if dims is not None else 0
        self.world = dims.world_size if dims is not None else 1
        self._forward = self.module
        if dims is not None and dims.dp > 1:
            # find_unused_parameters: a model may leave some parameters out of a step (fastfold's
            # template embedder without templates, a head whose loss weight is 0, a branch one rank
            # skips); DDP then marks them ready instead of waiting for them, and AdamW skips them
            self._forward = nn.parallel.DistributedDataParallel(self.module, process_group=dims.dp_group,
                                                                find_unused_parameters=True)
        self.named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        # tied weights appear once in ``named`` but under every name in a state_dict (as Gemini's)
        first: dict[int, str] = {}
        self.aliases = {n: first.setdefault(id(p), n) for n, p in module.named_parameters(remove_duplicate=False)}
        self.aliases = {n: name for n, name in self.aliases.items() if n != name}
        decay = [p for _, p in self.named if ocfg.decays(tuple(p.shape))]
        rest = [p for _, p in self.named if not ocfg.decays(tuple(p.shape))]
        groups = [g for g in ({"params": decay, "weight_decay": ocfg.weight_decay}, {"params": rest, "weight_decay": 0.0}) if g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=ocfg.lr, betas=ocfg.betas, eps=ocfg.eps, fused=True)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self._forward(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> dict[str, float]:
        reduce_partial_grads(p for _, p in self.named)  # DAP / sequence-parallel shares, summed once per update
        self.scaler.unscale_(self.optimizer)
        params = [p for _, p in self.named if p.grad is not None]
        max_norm = self.ocfg.max_grad_norm if self.ocfg.max_grad_norm > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = self.scaler.is_enabled() and self.scaler.get_scale() < scale
        return {"grad_norm": norm, "skipped": float(skipped), "loss_scale": scale}

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def train(self, mode: bool = True) -> PlainEngine:
        self.module.train(mode)
        return self

    def eval(self) -> PlainEngine:
        return self.train(False)

    def stats(self) -> dict[str, float]:
        return {"loss_scale": self.scaler.get_scale() if self.scaler.is_enabled() else 1.0}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)

    def param_values(self) -> dict[str, torch.Tensor]:
        return dict(self.module.named_parameters())

    def export_trainable(self) -> TrainableState:
        values, moments = {}, {}
        for name, param in self.named:
            values[name] = param.detach().cpu().float()
            state = self.optimizer.state.get(param, {})
            if "step" in state:
                moments[name] = {k: state[k].detach().cpu() for k in ("exp_avg", "exp_avg_sq")} | {"step": float(state["step"])}
        scaler = self.scaler.state_dict()  # {} unless fp16
        return TrainableState(values=values, moments=moments, scale=scaler.get("scale", 1.0),
                              calm_steps=scaler.get("_growth_tracker", 0))

    def import_trainable(self, state: TrainableState) -> None:
        with torch.no_grad():
            for name, param in self.named:
                param.copy_(state.values[name])
                if name in state.moments:
                    moment = state.moments[name]
                    self.optimizer.state[param] = {
                        "step": torch.tensor(moment["step"], dtype=torch.float32, device=param.device),
                        **{k: moment[k].to(param.device) for k in ("exp_avg", "exp_avg_sq")},
                    }
        if self.scaler.is_enabled():
            scaler = self.scaler.state_dict() | {"scale": float(state.scale), "_growth_tracker": int(state.calm_steps)}
            self.scaler.load_state_dict(scaler)

    # -- EMA views ------------------------------------------------------------------------------
    def master_tensors(self) -> list[torch.Tensor]:
        return [p.data for _, p in self.named]

    def track(self, flat: list[torch.Tensor]) -> None:
        """Parameters never move here: nothing to keep in step."""

    def named_from(self, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {n: t.detach().cpu().clone() for (n, _), t in zip(self.named, tensors, strict=True)}
        return out | {alias: out[name] for alias, name in self.aliases.items() if name in out}

    def flat_from(self, named: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [named[n].to(self.device, torch.float32) for n, _ in self.named]

    # -- checkpoints (rank 0 writes: every rank holds the same state) -----------------------------
    def save(self, folder: str | Path) -> None:
        if self.rank != 0:
            return
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "model.safetensors") as tmp:
            save_model(self.module, str(tmp))  # drops tied duplicates, which load_model restores
        tensors, steps = {}, {}
        for i, (_, p) in enumerate(self.named):
            state = self.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    tensors[f"{i}.{key}"] = state[key].detach().cpu()
            if "step" in state:
                steps[str(i)] = float(state["step"])
        with atomic_path(folder / "optimizer.safetensors") as tmp:
            save_file(tensors, str(tmp))
        meta = {"names": [n for n, _ in self.named], "steps": steps, "scaler": self.scaler.state_dict()}
        write_text(folder / "optimizer.json", json.dumps(meta))

    def save_pretrained(self, folder: str | Path, *, max_shard_bytes: int = pretrained.DEFAULT_SHARD_BYTES,
                        dtype: torch.dtype | None = None) -> None:
        weights = dict(self.module.named_parameters()) | pretrained.persistent_buffers(self.module)
        pretrained.save_pretrained(folder, [weights], module=self.module, write=self.rank == 0,
                                   max_shard_bytes=max_shard_bytes, dtype=dtype)

    def load(self, folder: str | Path) -> None:
        folder = Path(folder)
        if not (folder / "model.safetensors").is_file():
            raise UserError(f"{folder}: no model.safetensors; not a checkpoint of the plain engine")
        missing, unexpected = load_model(self.module, str(folder / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise UserError(f"{folder}/model.safetensors does not fit this model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        meta = json.loads((folder / "optimizer.json").read_text())
        if meta["names"] != [n for n, _ in self.named]:
            raise UserError(f"{folder}/optimizer.json: the trainable parameters differ from this model's")
        tensors = load_file(str(folder / "optimizer.safetensors"))
        for i, (_, p) in enumerate(self.named):
            if str(i) in meta["steps"]:
                self.optimizer.state[p] = {
                    "step": torch.tensor(meta["steps"][str(i)], dtype=torch.float32, device=p.device),
                    "exp_avg": tensors[f"{i}.exp_avg"].to(p.device),
                    "exp_avg_sq": tensors[f"{i}.exp_avg_sq"].to(p.device),
                }
        if meta["scaler"]:
            self.scaler.load_state_dict(meta["scaler"])
