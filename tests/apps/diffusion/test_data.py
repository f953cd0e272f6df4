"""Caption folders: the three layouts, bad input (clear error or counted skip), seeded stream."""

import itertools
import json

import pytest
import torch
from PIL import Image

from ferryman.apps.diffusion import data
from ferryman.core.errors import UserError

from .conftest import SAMPLES


def _images(folder, n=3, size=(40, 24)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (40 * i, 100, 200)).save(folder / f"img{i}.png")
    return [f"img{i}.png" for i in range(n)]


def _jsonl(folder, rows):
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_shipped_samples_scan():
    scan = data.scan_folder(SAMPLES)
    assert len(scan.records) == 8 and not scan.skipped
    assert scan.records[0].caption == "a red circle on a blue background"


def test_csv_layout_with_other_columns(tmp_path):
    names = _images(tmp_path)
    lines = ["image,caption"] + [f"{n},caption {i}" for i, n in enumerate(names)]
    (tmp_path / "captions.csv").write_text("\n".join(lines) + "\n")
    scan = data.scan_folder(tmp_path, caption_column="caption")
    assert [r.caption for r in scan.records] == ["caption 0", "caption 1", "caption 2"]
    assert scan.records[1].path == tmp_path / "img1.png"


def test_txt_sidecars_and_image_without_caption_is_counted(tmp_path):
    names = _images(tmp_path)
    for name in names[:2]:
        (tmp_path / name).with_suffix(".txt").write_text(f"  a picture of {name}\n")
    scan = data.scan_folder(tmp_path)
    assert [r.caption for r in scan.records] == ["a picture of img0.png", "a picture of img1.png"]
    assert scan.skipped == {"without caption": 1}
    assert "1 without caption" in scan.summary()


def test_missing_caption_column_names_file_and_columns(tmp_path):
    names = _images(tmp_path)
    _jsonl(tmp_path, [{"file_name": n, "caption": "x"} for n in names])
    with pytest.raises(UserError, match=r"metadata.jsonl.*line 1.*'text'.*columns: caption, file_name"):
        data.scan_folder(tmp_path)


def test_missing_and_corrupt_images_are_counted_skips(tmp_path):
    names = _images(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    _jsonl(tmp_path, [{"file_name": n, "text": "ok"} for n in names]
           + [{"file_name": "gone.png", "text": "x"}, {"file_name": "broken.png", "text": "y"}])
    scan = data.scan_folder(tmp_path)
    assert len(scan.records) == 3
    assert scan.skipped == {"missing": 1, "unreadable": 1}
    with pytest.raises(UserError, match=r"gone\.png: missing"):
        data.scan_folder(tmp_path, on_bad="error")


def test_corrupt_image_with_on_bad_error_names_file(tmp_path):
    _images(tmp_path, n=1)
    (tmp_path / "broken.png").write_bytes(b"garbage")
    _jsonl(tmp_path, [{"file_name": "broken.png", "text": "y"}])
    with pytest.raises(UserError, match=r"broken.png: unreadable"):
        data.scan_folder(tmp_path, on_bad="error")


def test_no_usable_image_is_an_error(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    _jsonl(tmp_path, [{"file_name": "gone.png", "text": "x"}])
    with pytest.raises(UserError, match=r"no usable images.*1 missing"):
        data.scan_folder(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        data.scan_folder(tmp_path / "nope")


def test_transform_crop_flip_and_range():
    image = Image.new("RGB", (60, 30), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 30, 30))  # left half white
    import random

    center = data.transform(image, resolution=16, center_crop=True, random_flip=False, rng=random.Random(0))
    # 60x30 -> 32x16, centre crop from column 8: 7 white columns, the bilinear seam (223, 32), 7 black
    row = torch.tensor([255.0] * 7 + [223.0, 32.0] + [0.0] * 7) / 127.5 - 1
    assert center.shape == (3, 16, 16) and torch.equal(center, row.expand(3, 16, 16))
    flips = [data.transform(image, resolution=16, center_crop=True, random_flip=True, rng=random.Random(s))
             for s in range(8)]
    flipped = [t for t in flips if not torch.equal(t, center)]
    assert flipped and all(torch.equal(t, center.flip(-1)) for t in flipped)


def test_stream_resumes_mid_run(tokenizer):
    scan = data.scan_folder(SAMPLES)
    stream = data.CaptionStream(scan.records, tokenizer, resolution=16, center_crop=False, random_flip=True, seed=3)
    full = list(data.stream_loader(stream, batch_size=3, start_batch=0, num_batches=5))
    tail = list(data.stream_loader(stream, batch_size=3, start_batch=2, num_batches=3))
    for a, b in zip(full[2:], tail):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["input_ids"], b["input_ids"])
        assert int(a["noise_seed"]) == int(b["noise_seed"])
    # every image appears once per epoch of 8 samples
    first_epoch = torch.cat([b["input_ids"] for b in full])[:8]
    assert len({tuple(row.tolist()) for row in first_epoch}) == 8
    assert len({int(b["noise_seed"]) for b in full}) == 5


def test_stream_loader_state_is_its_batch_position(tokenizer):
    import itertools

    scan = data.scan_folder(SAMPLES)
    stream = data.CaptionStream(scan.records, tokenizer, resolution=16, center_crop=False, random_flip=True, seed=3)
    expected = list(data.stream_loader(stream, batch_size=3, start_batch=0, num_batches=5))
    loader = data.StreamLoader(stream, batch_size=3)
    head = list(itertools.islice(loader, 2))
    assert loader.state_dict() == {"samples": 6}  # two batches of 3
    resumed = data.StreamLoader(stream, batch_size=3)
    resumed.load_state_dict(loader.state_dict())
    tail = list(itertools.islice(resumed, 3))  # endless: the loop decides when to stop
    for a, b in zip(expected, head + tail):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and int(a["noise_seed"]) == int(b["noise_seed"])
    assert resumed.state_dict() == {"samples": 15}


CAPTIONS = ['a "quoted" word, then a comma', "naïve café, 東京の夜 🚀", "tab\there; semicolon | pipe",
            "it's 50% off: back\\slash", "two\nlines in one caption"]


@pytest.mark.parametrize("layout", ["csv", "jsonl"])
def test_captions_with_commas_quotes_and_unicode_come_back_exactly(tmp_path, tokenizer, layout):
    import csv

    names = _images(tmp_path, n=len(CAPTIONS))
    if layout == "csv":  # as a spreadsheet writes it: a BOM, quoted fields, CRLF line ends
        with open(tmp_path / "metadata.csv", "w", newline="", encoding="utf-8-sig") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file_name", "text"])
            writer.writerows(zip(names, CAPTIONS))
    else:
        (tmp_path / "metadata.jsonl").write_text(
            "".join(json.dumps({"file_name": n, "text": c}, ensure_ascii=False) + "\n" for n, c in zip(names, CAPTIONS)),
            encoding="utf-8")
    scan = data.scan_folder(tmp_path)
    assert [(r.path.name, r.caption) for r in scan.records] == list(zip(names, CAPTIONS))
    stream = data.CaptionStream(scan.records, tokenizer, resolution=16, center_crop=True, random_flip=False, seed=0)
    ids = {tuple(stream[k]["input_ids"].tolist()) for k in range(len(CAPTIONS))}
    assert len(ids) == len(CAPTIONS)  # every caption tokenizes to its own ids


def test_skipped_images_are_named_in_the_summary(tmp_path):
    names = _images(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"garbage")
    _jsonl(tmp_path, [{"file_name": n, "text": "ok"} for n in names]
           + [{"file_name": "gone.png", "text": "x"}, {"file_name": "broken.png", "text": "y"}])
    summary = data.scan_folder(tmp_path).summary()
    assert "skipped: 1 missing, 1 unreadable: gone.png (missing), broken.png (unreadable (" in summary


def test_stream_position_carries_over_to_another_split_of_the_same_global_batch(tokenizer):
    """A checkpoint's position is samples consumed: a resume may split the global batch of 6
    differently (3 micro-batches of 2, or 2 processes x 3), and refuses a global batch of 4."""
    scan = data.scan_folder(SAMPLES)
    stream = data.CaptionStream(scan.records, tokenizer, resolution=16, center_crop=True, random_flip=False, seed=3)
    whole = data.StreamLoader(stream, batch_size=6)
    whole.load_state_dict({"samples": 12})  # two steps done
    accum = data.StreamLoader(stream, batch_size=2, share=data.Share(accum=3))
    accum.load_state_dict(whole.state_dict())
    ranks = [data.StreamLoader(stream, batch_size=3, share=data.Share(ranks=2, rank=r)) for r in (0, 1)]
    for loader in ranks:
        loader.load_state_dict(whole.state_dict())
    [step] = itertools.islice(whole, 1)
    micro = list(itertools.islice(accum, 3))
    halves = [next(iter(loader)) for loader in ranks]
    assert torch.equal(torch.cat([m["pixel_values"] for m in micro]), step["pixel_values"])
    assert torch.equal(torch.cat([h["pixel_values"] for h in halves]), step["pixel_values"])
    assert {int(m["noise_seed"]) for m in micro + halves} == {int(step["noise_seed"])}
    assert [m["noise_slice"].tolist() for m in micro] == [[0, 6], [2, 6], [4, 6]]
    assert accum.state_dict() == {"samples": 18} and whole.state_dict() == {"samples": 18}
    with pytest.raises(UserError, match=r"12 samples.*global batches of 8"):
        data.StreamLoader(stream, batch_size=8).load_state_dict({"samples": 12})
