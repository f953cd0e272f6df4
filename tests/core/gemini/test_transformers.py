"""Gemini on real model classes: transformers GPT-2 and OPT built from tiny configs (random weights)."""

import collections
import copy

import pytest
import torch

from ferryman.core.gemini import GeminiConfig, OptimConfig, gemini

transformers = pytest.importorskip("transformers")


def _gpt2():
    cfg = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # dropout would draw different random numbers
    )
    return transformers.GPT2LMHeadModel(cfg)


def _opt():
    cfg = transformers.OPTConfig(
        num_hidden_layers=2, num_attention_heads=2, hidden_size=32, ffn_dim=64, vocab_size=64,
        max_position_embeddings=16, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )
    return transformers.OPTForCausalLM(cfg)


def _data(steps: int):
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 64, (2, 12), generator=gen) for _ in range(steps)]


@pytest.mark.parametrize(("build", "recompute"), [(_gpt2, False), (_gpt2, True), (_opt, False)])
def test_hf_causal_lm_matches_plain_adamw(build, recompute):
    torch.manual_seed(0)
    model = build()
    reference = copy.deepcopy(model)
    if recompute:
        for m in (model, reference):
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    reference.train()
    ocfg = OptimConfig(lr=3e-3, weight_decay=0.01, max_grad_norm=1.0)
    params = sum(p.numel() for p in model.parameters())
    budget = params * 4 * 2  # fp32 weights plus some room: the rest of the state goes to the host
    engine = gemini(model, GeminiConfig(placement="auto", precision="fp32", device_budget_bytes=budget), ocfg)
    decay = [p for p in reference.parameters() if p.dim() >= 2]
    rest = [p for p in reference.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=3e-3, fused=True)
    for ids in _data(4):
        expected = reference(input_ids=ids, labels=ids).loss
        expected.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        got = engine(input_ids=ids, labels=ids).loss
        engine.backward(got)
        engine.step()
        engine.zero_grad()
        assert got.item() == pytest.approx(expected.item(), abs=1e-5)
    state = engine.state_dict()
    for name, value in reference.state_dict().items():
        assert torch.allclose(state[name], value, atol=1e-5), name
    assert engine.stats()["peak_bytes"] <= budget
    assert engine.stats()["evictions"] > 0
    # warm-up events per module: forward + backward, plus the recomputation when checkpointing
    uses = max(collections.Counter(engine.manager.tracer.modules).values())
    assert uses == (3 if recompute else 2)


def test_gpt2_bf16_loss_falls():
    torch.manual_seed(0)
    model = _gpt2()
    engine = gemini(model, GeminiConfig(placement="static", precision="bf16", param_host_fraction=0.5), OptimConfig(lr=1e-2))
    ids = _data(1)[0]
    losses = []
    for _ in range(8):  # overfit one batch
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        engine.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
