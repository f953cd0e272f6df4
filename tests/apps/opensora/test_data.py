"""Clip table, PyAV/decord readers, resize-crop, buckets, the loader and skipping unreadable clips."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ferryman.apps.opensora.config import Bucket, DataConfig
from ferryman.apps.opensora.data import (
    UnreadableClip,
    VideoInfo,
    assign,
    build_loader,
    describe,
    index_clips,
    probe,
    read_frames,
    read_table,
    resize_crop,
    write_mp4,
)
from ferryman.apps.opensora.data.buckets import bucket_size
from ferryman.core.errors import UserError

from .conftest import CLIPS

CSV = CLIPS / "clips.csv"


def _cfg(**kw) -> DataConfig:
    base = dict(csv=CSV, buckets=[Bucket(resolution=32, num_frames=8, batch_size=2)],
                aspect_ratios=[0.75, 1.0, 1.3333], size_multiple=8)
    return DataConfig(**{**base, **kw})


def test_sample_clips_match_their_table():
    records = read_table(CSV)
    assert len(records) == 6
    shapes = {(r.height, r.width) for r in records}
    assert shapes == {(48, 64), (64, 48), (64, 64)}
    for rec in records:
        info = probe(rec.path)
        assert (info.num_frames, info.height, info.width, info.fps) == (rec.num_frames, rec.height, rec.width, rec.fps)


def test_table_errors_name_file_row_and_column(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,caption\nx.mp4,hello\n")
    with pytest.raises(UserError, match=r"bad.csv: missing column\(s\) text"):
        read_table(bad)
    bad.write_text("path,text,num_frames\nx.mp4,hello,many\n")
    with pytest.raises(UserError, match="row 2: column num_frames must be a number"):
        read_table(bad)
    with pytest.raises(UserError, match="does not exist"):
        read_table(tmp_path / "none.csv")


def test_windowed_read_equals_frames_of_a_full_decode():
    path = CLIPS / "circle_diag.mp4"
    full = read_frames(path, list(range(24)))
    window = read_frames(path, [13, 15, 17, 19])  # starts after a key frame (g=4): needs the seek
    assert np.array_equal(window, full[[13, 15, 17, 19]])
    assert not np.array_equal(full[13], full[19])  # the shape really moves


@pytest.mark.parametrize("name", ["circle_diag.mp4", "circle_right.mp4", "square_left.mp4"])
def test_pyav_and_decord_read_the_same_frames(name):
    pytest.importorskip("decord")
    indices = [0, 3, 5, 6]
    assert np.array_equal(read_frames(CLIPS / name, indices, "pyav"), read_frames(CLIPS / name, indices, "decord"))


def test_decord_width_bug_falls_back_to_pyav_in_a_separate_process():
    """decord 0.6.0 fails on 48-px-wide clips; run it where a crash could not take pytest down."""
    pytest.importorskip("decord")
    code = (
        "import numpy as np; from pathlib import Path\n"
        "from ferryman.apps.opensora.data import read_frames\n"
        f"p = Path({str(CLIPS / 'square_down.mp4')!r})\n"
        "a = read_frames(p, [1, 2], 'decord'); b = read_frames(p, [1, 2], 'pyav')\n"
        "print(a.shape, np.array_equal(a, b))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(2, 64, 48, 3) True"


def test_resize_crop_covers_then_centre_crops():
    frames = np.zeros((2, 48, 64, 3), dtype=np.uint8)
    frames[:, :, 32:] = 255  # right half white
    video = resize_crop(frames, 32, 32)
    assert video.shape == (3, 2, 32, 32)
    assert torch.allclose(video[:, :, :, :14], torch.tensor(-1.0)) and torch.allclose(video[:, :, :, 18:], torch.tensor(1.0))


def test_resize_crop_values_and_layout_are_exact_when_no_resize_is_needed():
    """A 2x4 frame cropped to 2x2 keeps columns 1-2 (the centre); uint8 v becomes v / 127.5 - 1,
    with colour first and time second."""
    frames = np.arange(2 * 2 * 4 * 3, dtype=np.uint8).reshape(2, 2, 4, 3)  # [T, H, W, 3]
    video = resize_crop(frames, 2, 2)
    expected = torch.from_numpy(frames[:, :, 1:3].astype(np.float32) / 127.5 - 1).permute(3, 0, 1, 2)
    assert torch.equal(video, expected)
    assert video[2, 1, 0, 1].item() == pytest.approx(frames[1, 0, 2, 2] / 127.5 - 1)


def test_bucket_sizes_follow_area_and_aspect():
    assert bucket_size(256, 1.0, 16) == (256, 256)
    # height/width 9:16 is landscape: height first, and swapping the aspect swaps the sides
    assert bucket_size(256, 0.5625, 16) == (192, 336)
    assert bucket_size(256, 1.7778, 16) == (336, 192)
    assert bucket_size(32, 0.75, 8) == (24, 40)


def test_bucket_choice_puts_resolution_before_frames_and_aspect_on_a_log_scale():
    """Expectations that flip if the orderings are swapped: a clip that fits both a larger frame
    size with fewer frames and a smaller one with more takes the larger size; a 72x100 clip (ratio
    0.72) is nearer 1.0 than 0.5 on a log scale (0.33 vs 0.37) but not on a linear one."""
    cfg = _cfg(buckets=[Bucket(resolution=32, num_frames=16), Bucket(resolution=48, num_frames=8)])
    key, _ = assign(VideoInfo(num_frames=16, height=48, width=64, fps=8), cfg)
    assert (key.resolution, key.num_frames) == (48, 8)
    cfg = _cfg(aspect_ratios=[0.5, 1.0], buckets=[Bucket(resolution=32, num_frames=8)])
    key, _ = assign(VideoInfo(num_frames=8, height=72, width=100, fps=8), cfg)
    assert (key.aspect, key.height, key.width) == (1.0, 32, 32)
    # aspect is height / width: a portrait clip twice as tall as wide is 2.0, not 0.5
    key, _ = assign(VideoInfo(num_frames=8, height=128, width=64, fps=8), _cfg(aspect_ratios=[0.5, 1.0, 2.0]))
    assert (key.aspect, key.height, key.width) == (2.0, 48, 24)


def test_csv_captions_keep_quoted_commas_newlines_and_unicode(tmp_path):
    """Everything the CSV format allows in a field: quoted commas, doubled quotes, a newline inside
    quotes, non-ASCII text; plus a spreadsheet's byte-order mark, CRLF line ends and padded names."""
    captions = ['a cat, then a dog', 'she said "hello"', 'two\nlines', 'café au lait, 猫 🎬']
    rows = ["path , text,num_frames"] + [f'c{i}.mp4,"{c.replace(chr(34), chr(34) * 2)}",{8 + i}' for i, c in enumerate(captions)]
    (tmp_path / "t.csv").write_bytes(("\ufeff" + "\r\n".join(rows) + "\r\n").encode("utf-8"))
    records = read_table(tmp_path / "t.csv")
    assert [r.text for r in records] == captions
    assert [(r.path.name, r.num_frames, r.row) for r in records] == [(f"c{i}.mp4", 8 + i, 2 + i) for i in range(4)]


def test_bucket_assignment_prefers_largest_resolution_then_longest_clip():
    cfg = _cfg(buckets=[Bucket(resolution=32, num_frames=8, batch_size=2), Bucket(resolution=48, num_frames=16),
                        Bucket(resolution=48, num_frames=8)])
    key, _ = assign(VideoInfo(num_frames=16, height=48, width=64, fps=8), cfg)
    assert (key.resolution, key.num_frames, key.aspect) == (48, 16, 0.75)
    key, _ = assign(VideoInfo(num_frames=12, height=48, width=64, fps=8), cfg)
    assert (key.resolution, key.num_frames) == (48, 8)
    key, _ = assign(VideoInfo(num_frames=12, height=64, width=48, fps=8), cfg)
    assert key.aspect == 1.3333
    key, why = assign(VideoInfo(num_frames=5, height=64, width=64, fps=8), cfg)
    assert key is None and "too short: 5 frames < 8" in why
    key, why = assign(VideoInfo(num_frames=16, height=16, width=16, fps=8), cfg)
    assert key is None and "too small" in why
    key, why = assign(VideoInfo(num_frames=12, height=64, width=64, fps=8), _cfg(frame_stride=2))
    assert key is None and "stride 2" in why  # 8 frames at stride 2 need 15


def test_sampler_order_follows_the_global_seed_and_dp_ranks_split_it():
    cfg = _cfg(buckets=[Bucket(resolution=32, num_frames=8, batch_size=1)])
    index = index_clips(cfg)

    def order(seed, rank=0, size=1):
        loader, _ = build_loader(cfg, index=index, dp_rank=rank, dp_size=size)
        torch.manual_seed(seed)
        return [i for batch in loader.batch_sampler for i, _ in batch]

    assert order(1) == order(1) and order(1) != order(2)
    assert sorted(order(1)) == list(range(6))
    halves = order(1, 0, 2), order(1, 1, 2)
    assert len(halves[0]) == len(halves[1]) == 3 and not set(halves[0]) & set(halves[1])


def test_loader_batches_have_one_bucket_shape_and_per_bucket_batch_size():
    cfg = _cfg(buckets=[Bucket(resolution=32, num_frames=8, batch_size=2)])
    loader, index = build_loader(cfg)
    assert len(index.unreadable) == 0
    batches = list(loader)
    assert len(batches) == len(loader) == 3  # 2 landscape, 2 portrait, 2 square clips: one batch of 2 each
    assert {tuple(b["video"].shape[-2:]) for b in batches} == {(24, 40), (32, 32), (40, 24)}
    for batch in batches:
        b, c, t, h, _ = batch["video"].shape
        assert (b, c, t) == (2, 3, 8) and len(batch["text"]) == 2
        assert torch.equal(batch["height"], torch.full((2,), float(h)))
        assert batch["num_skipped"] == 0


def test_empty_loader_is_an_error_that_explains_each_bucket():
    cfg = _cfg(buckets=[Bucket(resolution=32, num_frames=30, batch_size=2), Bucket(resolution=48, num_frames=8, batch_size=4)])
    with pytest.raises(UserError) as err:
        build_loader(cfg)
    text = str(err.value)
    assert "gives no full batch" in text
    assert "< batch size 4" in text
    assert "shorter than 30 frames" in text


def test_data_check_table_names_why_a_bucket_is_empty():
    cfg = _cfg(aspect_ratios=[0.5625, 0.75, 1.0, 1.3333], buckets=[Bucket(resolution=32, num_frames=20, batch_size=1)])
    text = describe(index_clips(cfg), cfg)
    assert "no clip has an aspect ratio near 0.5625" in text
    assert "of 2 clip(s) at this aspect ratio: 2 shorter than 20 frames" in text
    assert "square_left.mp4: too short: 8 frames < 20" in text
    assert "6 clips, 0 unreadable" in text


def _corrupt_table(tmp_path: Path) -> Path:
    for name in ("circle_diag.mp4", "square_diag.mp4", "circle_right.mp4"):
        shutil.copy(CLIPS / name, tmp_path / name)
    (tmp_path / "broken.mp4").write_bytes((CLIPS / "circle_diag.mp4").read_bytes()[:300])  # truncated
    (tmp_path / "noise.mp4").write_bytes(bytes(range(256)) * 8)
    rows = [
        "path,text,num_frames,height,width,fps",
        "circle_diag.mp4,a white circle,24,64,64,8",
        "square_diag.mp4,a red square,20,64,64,8",
        "broken.mp4,claims to be fine,24,64,64,8",  # sizes given: only reading finds out
        "noise.mp4,not a video,,,,",
        "missing.mp4,gone,24,64,64,8",
    ]
    (tmp_path / "clips.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "clips.csv"


def test_corrupt_and_missing_clips_are_skipped_and_counted(tmp_path):
    cfg = _cfg(csv=_corrupt_table(tmp_path), buckets=[Bucket(resolution=32, num_frames=8, batch_size=1)])
    loader, index = build_loader(cfg)
    unreadable = {p.name for p, _ in index.unreadable}
    assert unreadable == {"noise.mp4", "missing.mp4"}  # found while indexing
    batches = list(loader)  # the truncated clip is only found while reading: skipped, counted, no exception
    assert sum(b["num_skipped"] for b in batches) == 1
    assert any("broken.mp4" in s for b in batches for s in b["skipped"])
    # its batch was filled with the next readable clip of its bucket, so every batch is full
    assert [b["video"].shape[0] for b in batches] == [1, 1, 1]
    assert sorted(b["text"][0] for b in batches).count("claims to be fine") == 0


def test_batch_of_only_unreadable_clips_is_counted_not_raised(tmp_path):
    csv = _corrupt_table(tmp_path)
    rows = csv.read_text().splitlines()
    csv.write_text("\n".join([rows[0], rows[3]]) + "\n")  # only the truncated clip
    loader, _ = build_loader(_cfg(csv=csv, buckets=[Bucket(resolution=32, num_frames=8, batch_size=1)]))
    (batch,) = list(loader)
    assert batch["video"] is None and batch["num_skipped"] == 1


def test_unreadable_clip_error_names_the_file(tmp_path):
    bad = tmp_path / "x.mp4"
    bad.write_bytes(b"\0" * 100)
    with pytest.raises(UnreadableClip, match=r"x\.mp4"):
        probe(bad)


def test_write_mp4_round_trips_frame_count_and_size(tmp_path):
    import av

    video = np.random.default_rng(0).integers(0, 255, (5, 24, 40, 3), dtype=np.uint8)
    path = write_mp4(tmp_path / "out.mp4", video, fps=8)
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (24, 40, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]  # no temporary left behind
    with pytest.raises(UserError, match="even"):
        write_mp4(tmp_path / "odd.mp4", video[:, :23], fps=8)


def test_parquet_table_reads_like_the_csv(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import csv

    import pyarrow.parquet as pq

    with open(CSV, newline="") as handle:
        rows = list(csv.DictReader(handle))
    table = pa.table({"path": [r["path"] for r in rows], "text": [r["text"] for r in rows],
                      "num_frames": [int(r["num_frames"]) for r in rows]})
    pq.write_table(table, tmp_path / "clips.parquet")
    records = read_table(tmp_path / "clips.parquet", root=CLIPS)
    from_csv = read_table(CSV)
    assert [(r.path, r.text, r.num_frames) for r in records] == [(r.path, r.text, r.num_frames) for r in from_csv]
    assert records[0].height is None and not records[0].has_sizes  # sizes missing: probed when indexing
    index = index_clips(_cfg(csv=tmp_path / "clips.parquet", root=CLIPS))
    assert [i.height for i in index.infos] == [r.height for r in from_csv]


def _live_pyav() -> int:
    """PyAV containers, frames and packets still alive in this process (they pin FFmpeg buffers)."""
    import gc

    import av

    gc.collect()
    kinds = (av.container.Container, av.VideoFrame, av.packet.Packet)
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), kinds))


def _open_fds() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_pyav_reader_closes_every_container_and_keeps_no_frames(tmp_path):
    """The anchor's host-memory leak came from PyAV objects outliving a read. After 60 windowed reads
    (seeks included), probes, a failing read and two loader epochs, no container, frame or packet is
    alive and no file is left open; a reader that forgets to close is caught by the same count."""
    import av

    from ferryman.apps.opensora.data.video import read_frames_pyav

    base_live, base_fds = _live_pyav(), _open_fds()
    clips = sorted(CLIPS.glob("*.mp4"))
    arrays = []
    for i in range(60):
        info = probe(clips[i % len(clips)])
        start = (i * 3) % (info.num_frames - 4)
        arrays.append(read_frames_pyav(clips[i % len(clips)], list(range(start, start + 4))))
    bad = tmp_path / "bad.mp4"
    bad.write_bytes((CLIPS / "circle_diag.mp4").read_bytes()[:3000])  # header fine, frames cut off
    with pytest.raises(UnreadableClip):
        read_frames_pyav(bad, list(range(16, 20)))
    loader, _ = build_loader(_cfg(buckets=[Bucket(resolution=32, num_frames=8, batch_size=1)]))
    for _ in range(2):
        assert len(list(loader)) == 6
    assert all(a.base is None or isinstance(a.base, np.ndarray) for a in arrays)  # plain copies, not views of frames
    assert _live_pyav() == base_live and _open_fds() == base_fds
    leaky = av.open(str(clips[0]))  # the negative control: a container left open shows in both counts
    next(leaky.decode(video=0))
    assert _live_pyav() > base_live and _open_fds() > base_fds
    leaky.close()
