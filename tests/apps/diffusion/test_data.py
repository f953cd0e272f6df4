"""Caption folders: the three layouts, bad input (clear error or counted skip), seeded stream."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError

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


# --- Every form a caption folder may take, every refusal as its exact line, and the stream's draws.


def _refused(call, message: str) -> None:
    with pytest.raises(UserError) as err:
        call()
    assert str(err.value) == message


@pytest.mark.parametrize("inner", ["\r\n", "\r"])
def test_a_quoted_line_break_in_a_csv_caption_is_kept_as_written(tmp_path, inner):
    names = _images(tmp_path, n=2)
    (tmp_path / "metadata.csv").write_bytes(f'file_name,text\r\n{names[0]},"one{inner}two"\r\n{names[1]},plain\r\n'.encode())
    assert [r.caption for r in data.scan_folder(tmp_path).records] == [f"one{inner}two", "plain"]


def test_image_column_found_by_its_known_names_or_given(tmp_path):
    """file_name, image, path, file are looked for in that order; extra columns are ignored; a
    relative name is under the folder; the caption is stripped."""
    names = _images(tmp_path, n=2)
    _jsonl(tmp_path, [{"file": "x.png", "path": n, "text": f"  cap {i} ", "extra": 1} for i, n in enumerate(names)])
    scan = data.scan_folder(tmp_path)
    assert [(r.path, r.caption) for r in scan.records] == [(tmp_path / n, f"cap {i}") for i, n in enumerate(names)]
    _jsonl(tmp_path, [{"picture": n, "words": "w"} for n in names])
    scan = data.scan_folder(tmp_path, caption_column="words", image_column="picture")
    assert [r.path.name for r in scan.records] == names and scan.source == str(tmp_path / "metadata.jsonl")


def test_malformed_caption_tables_are_refused_in_one_line(tmp_path):
    names = _images(tmp_path, n=1)
    jsonl = tmp_path / "metadata.jsonl"
    jsonl.write_text("\n  \n")
    _refused(lambda: data.scan_folder(tmp_path), f"{jsonl} lists no images")
    _jsonl(tmp_path, [{"name": names[0], "text": "a"}])
    _refused(lambda: data.scan_folder(tmp_path),
             f"{jsonl} has no image column (looked for file_name, image, path, file); its columns are: name, text")
    _refused(lambda: data.scan_folder(tmp_path, image_column="picture"),
             f"{jsonl} has no image column (looked for picture); its columns are: name, text")
    _jsonl(tmp_path, [{"file_name": names[0], "text": "a"}, {"file_name": "", "text": "b", "z": 0}])
    _refused(lambda: data.scan_folder(tmp_path),
             f"{jsonl} line 2: no image file name in column 'file_name' (columns: file_name, text, z)")
    jsonl.unlink()
    csv_file = tmp_path / "metadata.csv"
    csv_file.write_text("")
    _refused(lambda: data.scan_folder(tmp_path), f"{csv_file} has no header row; expected columns such as file_name,text")
    csv_file.write_text(f"file_name,text\n{names[0]},a\n{names[0]}," + "x" * 140_000 + "\n")
    _refused(lambda: data.scan_folder(tmp_path),
             f"{csv_file} line 3: not readable as CSV (field larger than field limit (131072))")


def test_folders_without_captions_or_images_are_refused_in_one_line(tmp_path):
    suffixes = ".bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp"
    (tmp_path / "notes.txt").write_text("no images here")
    _refused(lambda: data.scan_folder(tmp_path),
             f"data folder {tmp_path} has no metadata.jsonl, metadata.csv/captions.csv, or images ({suffixes})")
    _refused(lambda: data.scan_prompt_folder(tmp_path, "a photo"), f"image folder {tmp_path} holds no images ({suffixes})")
    _images(tmp_path, n=1)
    (tmp_path / "img0.txt").write_bytes(b"caf\xe9\n")
    _refused(lambda: data.scan_folder(tmp_path),
             f"{tmp_path / 'img0.txt'} line 1: not UTF-8 text (byte 0xe9); is this the caption file?")


def test_prompt_folder_scan_names_its_source_and_follows_on_bad(tmp_path):
    names = _images(tmp_path, n=2)
    scan = data.scan_prompt_folder(tmp_path, "a sks dog")
    assert [(r.path.name, r.caption) for r in scan.records] == [(n, "a sks dog") for n in names]
    assert scan.summary() == f"2 images with captions from {tmp_path} (prompt 'a sks dog')"
    (tmp_path / "z.png").write_bytes(b"garbage")
    assert data.scan_prompt_folder(tmp_path, "a sks dog").skipped == {"unreadable": 1}
    with pytest.raises(UserError, match=r"z\.png: unreadable"):
        data.scan_prompt_folder(tmp_path, "a sks dog", on_bad="error")
    for name in names:
        (tmp_path / name).unlink()
    reason = _pil_reason(tmp_path / "z.png")
    _refused(lambda: data.scan_prompt_folder(tmp_path, "a sks dog"),
             f"no usable images in {tmp_path}: 0 images with captions from {tmp_path} (prompt 'a sks dog') "
             f"(skipped: 1 unreadable: z.png (unreadable ({reason})))")


def _pil_reason(path) -> str:
    with pytest.raises(UnidentifiedImageError) as err:
        Image.open(path)
    return str(err.value).splitlines()[0]


@pytest.mark.parametrize(("bad", "tail"), [(5, ""), (6, " and 1 more"), (8, " and 3 more")])
def test_the_summary_names_five_skipped_images_and_counts_the_rest(tmp_path, bad, tail):
    names = _images(tmp_path, n=2)
    _jsonl(tmp_path, [{"file_name": n, "text": "ok"} for n in names] + [{"file_name": f"gone{i}.png", "text": "x"} for i in range(bad)])
    scan = data.scan_folder(tmp_path)
    named = ", ".join(f"gone{i}.png (missing)" for i in range(5))
    assert scan.summary() == f"2 images with captions from {tmp_path / 'metadata.jsonl'} (skipped: {bad} missing: {named}{tail})"


def test_an_unreadable_image_without_a_message_is_named_by_the_error_type(tmp_path, monkeypatch):
    names = _images(tmp_path, n=2)
    _jsonl(tmp_path, [{"file_name": n, "text": "ok"} for n in names])

    def fail(path):
        if Path(path).name == names[1]:
            raise OSError()
        return real(path)

    real = data.Image.open
    monkeypatch.setattr(data.Image, "open", fail)
    assert data.scan_folder(tmp_path).skipped_files == [f"{names[1]} (unreadable (OSError))"]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_images_of_any_mode_load_as_rgb(tmp_path, mode):
    path = tmp_path / ("img.tif" if mode == "CMYK" else "img.png")
    Image.new("RGB", (4, 2), (200, 100, 50)).convert(mode).save(path)
    image = data.load_image(path)
    assert image.mode == "RGB" and image.size == (4, 2)
    assert image.getpixel((1, 1)) == Image.open(path).convert("RGB").getpixel((1, 1))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"garbage")
    with pytest.raises(UnidentifiedImageError) as err:
        Image.open(broken)
    _refused(lambda: data.load_image(broken), f"{broken}: cannot decode image ({err.value})")


def _gradient(width: int, height: int) -> Image.Image:
    """Every pixel different: red grows to the right, green downwards."""
    x = np.linspace(0, 255, width).round().astype(np.uint8)
    y = np.linspace(0, 255, height).round().astype(np.uint8)
    rgb = np.stack(np.broadcast_arrays(x[None, :], y[:, None], np.full((height, width), 128, np.uint8)), axis=-1)
    return Image.fromarray(np.ascontiguousarray(rgb))


def _expected(image: Image.Image, size: tuple[int, int], box: tuple[int, int]) -> torch.Tensor:
    crop = image.resize(size, Image.Resampling.BILINEAR).crop((*box, box[0] + 16, box[1] + 16))
    return torch.from_numpy(np.asarray(crop, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


@pytest.mark.parametrize(("width", "height", "size", "box"), [
    (70, 32, (35, 16), (9, 0)),  # landscape: short side 32 -> 16, long 70 -> 35; (35 - 16) // 2 = 9
    (32, 70, (16, 35), (0, 9)),  # portrait
    (20, 20, (16, 16), (0, 0)),  # square, downscaled
    (9, 12, (16, 21), (0, 2)),  # upscaled: 12 * 16 / 9 = 21.3 -> 21
])
def test_center_crop_resizes_the_short_side_then_takes_the_middle(width, height, size, box):
    import random

    image = _gradient(width, height)
    out = data.transform(image, resolution=16, center_crop=True, random_flip=False, rng=random.Random(0))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out, _expected(image, size, box), rtol=0, atol=0)


@pytest.mark.parametrize(("width", "height", "size"), [(70, 32, (35, 16)), (32, 70, (16, 35))])
def test_random_crop_is_a_window_inside_the_image_anywhere_along_the_long_side(width, height, size):
    import random

    image = _gradient(width, height)
    windows = {(left, 0) if width > height else (0, left): _expected(image, size, (left, 0) if width > height else (0, left))
               for left in range(20)}
    seen = set()
    for seed in range(40):
        out = data.transform(image, resolution=16, center_crop=False, random_flip=False, rng=random.Random(seed))
        [box] = [b for b, want in windows.items() if torch.equal(out, want)]
        seen.add(box)
    assert len(seen) >= 10  # spread over the 20 positions


def test_a_flip_is_a_fair_coin_only_when_asked_for():
    import random

    image = _gradient(16, 16)
    plain = data.transform(image, resolution=16, center_crop=True, random_flip=False, rng=random.Random(0))
    flips = []
    for seed in range(40):
        kept = data.transform(image, resolution=16, center_crop=True, random_flip=False, rng=random.Random(seed))
        assert torch.equal(kept, plain)
        out = data.transform(image, resolution=16, center_crop=True, random_flip=True, rng=random.Random(seed))
        assert torch.equal(out, plain) or torch.equal(out, plain.flip(-1))
        flips.append(torch.equal(out, plain.flip(-1)))
    assert flips == [random.Random(seed).random() < 0.5 for seed in range(40)] and 10 < sum(flips) < 30


def _mix_by_hand(*numbers: int) -> int:
    """The seed mixer written out with modular arithmetic (SplitMix64's multiply and xor-shift)."""
    value = 11400714819323198485  # 2^64 / golden ratio
    for number in numbers:
        value = ((value ^ (number % 2**64)) * 13787848793156543929) % 2**64
        value = value ^ (value // 2**31)
    return value % 2**63


def test_seed_mixing_is_stable():
    """Stream seeds must not change between versions: a run resumed by another version draws
    the same samples, crops and noise."""
    for numbers in [(), (0,), (3, 0, 1), (3, 1, 1), (2**40 + 7, 2, 5), (-1,), (5, 0, 2, 7, 1)]:
        assert data._mix(*numbers) == _mix_by_hand(*numbers), numbers
    assert data._mix(2**64 + 5) == data._mix(5) and data._mix(3, 0, 1) != data._mix(3, 1, 0)


def _stream(records, tokenizer, seed=3, prior=None, **options):
    options = {"resolution": 16, "center_crop": False, "random_flip": True} | options
    return data.CaptionStream(records, tokenizer, seed=seed, prior=prior, **options)


def test_sample_k_is_the_documented_function_of_seed_and_k(tokenizer):
    """Sample k of N: epoch k // N, position k % N of randperm(N) seeded _mix(seed, 0, epoch); its crop
    and flip from Random(_mix(seed, 0, epoch, position, 1)). Class images: stream 1 likewise. The
    noise of global batch b: _mix(seed, 2, b)."""
    import random

    records = data.scan_folder(SAMPLES).records  # 8
    prior = records[:3]
    stream = _stream(records, tokenizer, prior=prior)
    for k in (0, 5, 8, 13, 22):
        item = stream[k]
        for key, pool, tag in (("", records, 0), ("prior_", prior, 1)):
            epoch, position = divmod(k, len(pool))
            order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(_mix_by_hand(3, tag, epoch)))
            record = pool[int(order[position])]
            rng = random.Random(_mix_by_hand(3, tag, epoch, position, 1))
            pixels = data.transform(data.load_image(record.path), resolution=16, center_crop=False, random_flip=True, rng=rng)
            assert torch.equal(item[f"{key}pixel_values"], pixels), (k, key)
            ids = tokenizer(record.caption, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids[0]
            assert torch.equal(item[f"{key}input_ids"], ids)
    batch = data.collate([stream[0]], seed=3, global_batch=4, first=9)
    assert int(batch["noise_seed"]) == _mix_by_hand(3, 2, 2) and batch["noise_slice"].tolist() == [1, 4]
    assert set(batch) == {"pixel_values", "input_ids", "prior_pixel_values", "prior_input_ids", "noise_seed", "noise_slice"}
    assert batch["prior_pixel_values"].shape == (1, 3, 16, 16)


def test_captions_are_padded_and_truncated_to_the_tokenizers_length(tmp_path, tokenizer):
    _images(tmp_path, n=2)
    long = " ".join(["cat"] * 100)
    (tmp_path / "img0.txt").write_text("a cat")
    (tmp_path / "img1.txt").write_text(long)
    records = data.scan_folder(tmp_path).records
    stream = _stream(records, tokenizer, center_crop=True, random_flip=False)
    by_caption = {records[int(i)].caption: stream[k]["input_ids"]
                  for k, i in enumerate(torch.randperm(2, generator=torch.Generator().manual_seed(_mix_by_hand(3, 0, 0))))}
    short = tokenizer("a cat").input_ids
    assert by_caption["a cat"].tolist() == short + [tokenizer.pad_token_id] * (77 - len(short))
    assert by_caption[long].tolist() == [*tokenizer(long).input_ids[:76], tokenizer.eos_token_id]


def test_loader_state_counts_whole_steps_and_reads_the_old_batch_count(tokenizer):
    """Three micro-batches into steps of two: the state holds the one whole step (as an integer, for
    the JSON state file); a state written before Share ({"batch": n}) resumes at micro-batch n * accum."""
    stream = _stream(data.scan_folder(SAMPLES).records, tokenizer, center_crop=True, random_flip=False)
    loader = data.StreamLoader(stream, batch_size=2, share=data.Share(accum=2))
    list(itertools.islice(loader, 3))
    assert json.dumps(loader.state_dict()) == '{"samples": 4}'
    old = data.StreamLoader(stream, batch_size=2, share=data.Share(accum=2))
    old.load_state_dict({"batch": 3})
    assert old.position == 6 and json.dumps(old.state_dict()) == '{"samples": 12}'
    [first] = itertools.islice(old, 1)
    [expected] = data.stream_loader(stream, batch_size=2, start_batch=6, num_batches=1, share=data.Share(accum=2))
    assert torch.equal(first["pixel_values"], expected["pixel_values"])


def test_unreadable_caption_files_and_settings_are_refused_in_one_line(tmp_path, monkeypatch):
    names = _images(tmp_path, n=2)
    csv_file = tmp_path / "metadata.csv"
    csv_file.write_bytes(f"file_name,text\n{names[0]},a\n{names[1]},b\xff\n".encode("latin-1"))
    _refused(lambda: data.scan_folder(tmp_path), f"{csv_file} line 3: not UTF-8 text (byte 0xff); is this the captions file?")
    _refused(lambda: data.scan_folder(tmp_path, on_bad="ignore"), "on_bad='ignore' must be 'skip' or 'error'")
    jsonl = tmp_path / "metadata.jsonl"
    jsonl.write_text(json.dumps({"file_name": names[0], "text": "a"}) + '\n["img1.png", "b"]\n')
    _refused(lambda: data.scan_folder(tmp_path), f"{jsonl} line 2: expected a JSON object, got list")
    jsonl.write_text('{"file_name": "img0.png", "text": "a"}\n\n{"file_name": "img1.png", text: "b"}\n')
    _refused(lambda: data.scan_folder(tmp_path),
             f"{jsonl} line 3: not valid JSON (Expecting property name enclosed in double quotes)")
    _jsonl(tmp_path, [{"file_name": "gone.png", "text": "a"}])
    _refused(lambda: data.scan_folder(tmp_path),
             f"no usable images in {tmp_path}: 0 images with captions from {jsonl} (skipped: 1 missing: gone.png (missing))")
    read_bytes = Path.read_bytes

    def failing(path):
        if path == jsonl:
            raise OSError(5, "Input/output error")
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", failing)
    _refused(lambda: data.scan_folder(tmp_path), f"{jsonl}: cannot read this captions file; it looks damaged or truncated "
                                                 "([Errno 5] Input/output error). Replace it, or remove it to start over")


def test_a_csv_with_old_mac_line_ends_reads_like_any_other(tmp_path):
    """CR alone ends a line (classic Mac OS, some exporters); a quoted CR stays in its caption."""
    names = _images(tmp_path, n=2)
    (tmp_path / "captions.csv").write_bytes(f'file_name,text\r{names[0]},a\r{names[1]},"x\ry"\r'.encode())
    assert [(r.path.name, r.caption) for r in data.scan_folder(tmp_path).records] == [(names[0], "a"), (names[1], "x\ry")]


def test_a_sidecar_folder_names_itself_and_follows_on_bad(tmp_path):
    names = _images(tmp_path, n=2)
    for name in names:
        (tmp_path / name).with_suffix(".txt").write_text("a caption")
    assert data.scan_folder(tmp_path).summary() == f"2 images with captions from {tmp_path} (.txt sidecars)"
    (tmp_path / "z.png").write_bytes(b"garbage")
    (tmp_path / "z.txt").write_text("broken")
    with pytest.raises(UserError, match=r"z\.png: unreadable"):
        data.scan_folder(tmp_path, on_bad="error")
    for name in names:
        (tmp_path / name).unlink()
    reason = _pil_reason(tmp_path / "z.png")
    _refused(lambda: data.scan_folder(tmp_path),
             f"no usable images in {tmp_path}: 0 images with captions from {tmp_path} (.txt sidecars) "
             f"(skipped: 1 unreadable: z.png (unreadable ({reason})))")


def test_image_names_in_subfolders_are_relative_to_the_data_folder(tmp_path):
    _images(tmp_path / "sub", n=1)
    _images(tmp_path, n=1)
    (tmp_path / "metadata.csv").write_text("text,file_name\nin a subfolder,sub/img0.png\nat the top,img0.png\n")
    scan = data.scan_folder(tmp_path)
    assert [(r.path, r.caption) for r in scan.records] == [(tmp_path / "sub" / "img0.png", "in a subfolder"),
                                                           (tmp_path / "img0.png", "at the top")]
