"""Reading .txt/.jsonl/.parquet, packing to --seq-len with prompt tokens left out of the loss, the
held-out split, and each data-parallel rank's share of every batch."""

import json

import pytest
import torch

from ferryman.apps.lm.config import DataConfig
from ferryman.apps.lm.data import (
    IGNORE,
    BlockLoader,
    Example,
    build_blocks,
    eval_batches,
    pack,
    read_examples,
    tokenize,
)
from ferryman.core.errors import UserError

from .conftest import TOKENIZER


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def test_every_format_and_a_folder_of_them(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("one document\nover two lines\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "t1"}) + "\n\n" + json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    pq.write_table(pa.table({"body": ["r1", "r2"], "other": [1, 2]}), tmp_path / "sub.parquet")
    (tmp_path / "notes.md").write_text("ignored")
    cfg = DataConfig(path=str(tmp_path))
    with pytest.raises(UserError, match=r"sub.parquet: no 'text' field .* 'body', 'other'"):
        read_examples(tmp_path, cfg)
    pq.write_table(pa.table({"text": ["r1", "r2"]}), tmp_path / "sub.parquet")
    got = read_examples(tmp_path, cfg)
    assert got == [Example("", "one document\nover two lines\n"), Example("", "t1"), Example("p", "c"),
                   Example("", "r1"), Example("", "r2")]


def test_text_field_flag_picks_the_field(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"content": "x", "text": 3}) + "\n")
    assert read_examples(tmp_path / "d.jsonl", DataConfig(text_field="content")) == [Example("", "x")]


def test_packing_keeps_the_stream_and_masks_prompts(tokenizer):
    examples = [Example("", "ab"), Example("Q:", "A")]
    ids, keep = tokenize(examples, tokenizer, train_on_prompt=False)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    a, b, q, colon, answer = (tokenizer.convert_tokens_to_ids(t) for t in ("a", "b", "Q", ":", "A"))
    assert ids.tolist() == [bos, a, b, eos, bos, q, colon, answer, eos]
    assert keep.tolist() == [True] * 4 + [False] * 3 + [True] * 2
    blocks = pack(ids, keep, 4)  # 9 tokens: two blocks of 4, the last token dropped
    assert blocks.input_ids.tolist() == [ids[:4].tolist(), ids[4:8].tolist()]
    assert blocks.labels.tolist() == [ids[:4].tolist(), [IGNORE, IGNORE, IGNORE, answer]]
    _, keep_all = tokenize(examples, tokenizer, train_on_prompt=True)
    assert all(keep_all)


def test_held_out_split_is_seeded_and_disjoint(tokenizer):
    examples = [Example("", f"{i} plus {i} is {2 * i}.") for i in range(40)]
    cfg = DataConfig(seq_len=16, eval_fraction=0.2)
    train, held = build_blocks(cfg, examples, None, tokenizer, seed=0)
    again, held_again = build_blocks(cfg, examples, None, tokenizer, seed=0)
    assert torch.equal(held.input_ids, held_again.input_ids) and torch.equal(train.input_ids, again.input_ids)
    total = len(train) + len(held)
    assert len(held) == round(0.2 * total)
    rows = {tuple(r) for r in train.input_ids.tolist()}
    assert not rows & {tuple(r) for r in held.input_ids.tolist()}
    _, other = build_blocks(cfg, examples, None, tokenizer, seed=1)
    assert not torch.equal(other.input_ids, held.input_ids)
    _, none = build_blocks(DataConfig(seq_len=16, eval_fraction=0.0), examples, None, tokenizer, seed=0)
    assert none is None


def test_ranks_share_each_global_batch_and_the_epoch_order_follows_the_seed(tokenizer):
    blocks = pack(list(range(4, 4 + 10 * 3)), [True] * 30, 3)  # ten blocks: [4, 5, 6], [7, 8, 9], ...
    whole = BlockLoader(blocks, batch_size=4)
    halves = [BlockLoader(blocks, batch_size=2, rank=r, world=2) for r in range(2)]
    torch.manual_seed(5)
    expected = [b["input_ids"] for b in whole]
    shares = []
    for loader in halves:
        torch.manual_seed(5)
        shares.append([b["input_ids"] for b in loader])
    assert len(expected) == 2  # ten blocks, global batch of four: the incomplete third is dropped
    for step, batch in enumerate(expected):
        assert torch.equal(torch.cat([shares[0][step], shares[1][step]]), batch)


def test_every_rank_evaluates_the_same_number_of_batches():
    blocks = pack(list(range(4, 4 + 5 * 2)), [True] * 10, 2)  # five held-out blocks
    seen, counts = [], []
    for rank in range(2):
        batches = list(eval_batches(blocks, batch_size=2, rank=rank, world=2))
        counts.append(len(batches))
        for batch, weights in batches:
            seen += [tuple(r) for r, w in zip(batch["input_ids"].tolist(), weights.tolist()) if w > 0]
    assert counts == [2, 2]
    assert sorted(seen) == sorted(tuple(r) for r in blocks.input_ids.tolist())  # each block once at weight 1
