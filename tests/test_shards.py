import io
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from helpers.shard_server import ShardServer
from PIL import Image

from mimswin.data import shard_stream
from mimswin.data.batches import DeviceStep
from mimswin.data.build import EpochLoader
from mimswin.data.pixels import Skipped
from mimswin.data.readers import ReadSpec, read_bytes, read_path
from mimswin.data.sampler import ResumableDistributedSampler
from mimswin.data.shard_stream import build_shard_loader, decode_sample, read_shard
from mimswin.data.sources import ImageFolder
from mimswin.data.transforms import eval_transform, pretrain_transform, resize
from mimswin.errors import DataError
from mimswin.programs.shards import cli as shards_cli

CPU = torch.device("cpu")
TO_8PX = eval_transform((8, 8))
AUGMENT = pretrain_transform((8, 8), [0.3, 1.0], 0.5)
RGB = ReadSpec(3)
STEP = DeviceStep([0.5] * 3, [0.5] * 3)


def shard_loader(spec, transform, *args, **kwargs):
    """`build_shard_loader` reading 3 channels normalized at 0.5 / 0.5, on the CPU."""
    batch, workers, replicas, rank, seed = args
    return build_shard_loader(spec, transform, RGB, STEP, batch, workers, replicas, rank, seed, CPU, **kwargs)


def png(value: int, size: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value % 256, value // 256, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_id_shards(root, sizes, sizes_json=True):
    """Shards whose samples carry their own id as label, so a test can tell every sample apart."""
    root.mkdir(parents=True, exist_ok=True)
    next_id = 0
    for s, size in enumerate(sizes):
        with wds.TarWriter(str(root / f"part-{s:06d}.tar")) as tar:
            for _ in range(size):
                tar.write({"__key__": f"id{next_id:06d}", "png": png(next_id), "cls": str(next_id).encode()})
                next_id += 1
    if sizes_json:
        (root / "sizes.json").write_text(json.dumps({f"part-{s:06d}.tar": n for s, n in enumerate(sizes)}))
    return f"{root}/part-{{000000..{len(sizes) - 1:06d}}}.tar"


def ids(batches):
    return [int(i) for _, labels in batches for i in labels]


def odd_image_folder(root):
    """Real-world oddities: CMYK JPEG, RGBA and 16-bit PNG, grayscale, a TIFF, an image smaller than the crop."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(5):
        Image.new("RGB", (20, 14), (40 * i, 10, 200)).save(root / "a" / f"photo.{i}.jpg")
    Image.new("CMYK", (16, 16), (0, 50, 100, 0)).save(root / "a" / "cmyk.jpg")
    Image.new("RGBA", (9, 9), (200, 0, 0, 128)).save(root / "b" / "rgba.png")
    Image.fromarray(np.arange(144, dtype=np.uint16).reshape(12, 12) * 400).save(root / "b" / "deep.png")
    Image.new("L", (3, 3), 90).save(root / "b" / "tiny_gray.png")
    Image.new("RGB", (10, 10), (1, 2, 3)).save(root / "b" / "scan.tiff")
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")


def test_writer_reader_round_trip_keeps_every_image_and_label(tmp_path, capsys):
    src = tmp_path / "images"
    odd_image_folder(src)
    out = tmp_path / "shards"
    assert shards_cli([str(src), str(out), "--maxcount", "4", "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert "wrote 10 images in 3 shards" in summary and "unreadable image: 1 (e.g. b/broken.jpg)" in summary
    assert json.loads((out / "sizes.json").read_text()) == {"train-000000.tar": 4, "train-000001.tar": 4,
                                                            "train-000002.tar": 2}
    assert json.loads((out / "classes.json").read_text()) == {"train": ["a", "b"]}

    written = {}
    for s in range(3):
        for sample in read_shard(str(out / f"train-{s:06d}.tar"), lambda url, err: pytest.fail(str(err))):
            ext = next(k for k in sample if not k.startswith("__") and k != "cls")
            written[sample["__key__"]] = (int(sample["cls"]), ext, sample[ext])
    expected = {}
    for path, label in ImageFolder(src).samples:
        if path.name != "broken.jpg":
            key = path.relative_to(src).with_suffix("").as_posix().replace(".", "_")
            expected[key] = (label, path)
    assert written.keys() == expected.keys()
    for key, (label, path) in expected.items():
        stored_label, ext, data = written[key]
        assert stored_label == label and data == path.read_bytes(), key
        assert torch.equal(read_bytes(data, ext, RGB), read_path(path, RGB)), key
    assert written["b/deep"][1] == "png" and written["b/scan"][1] == "tiff"

    loader = shard_loader(f"{out}/train-{{000000..000002}}.tar", TO_8PX, 3, 0, 1, 0, 0, train=False)
    batches = list(loader.epoch(0))
    assert Counter(ids(batches)) == Counter(label for label, _ in expected.values())
    assert all(images.shape[1:] == (3, 8, 8) and images.dtype == torch.float32 for images, _ in batches)
    assert loader.skipped == 0


def test_embedded_set_becomes_shards_with_its_labels(tmp_path):
    out = tmp_path / "shards"
    assert shards_cli(["embedded:val", str(out), "--maxcount", "400", "--no-progress"]) == 0
    assert json.loads((out / "sizes.json").read_text()) == {"val-000000.tar": 400, "val-000001.tar": 400,
                                                            "val-000002.tar": 200}
    loader = shard_loader(f"{out}/val-*.tar", TO_8PX, 100, 0, 1, 0, 0, train=False)
    from mimswin.data.sources import EmbeddedMNIST
    assert Counter(ids(loader.epoch(0))) == Counter(EmbeddedMNIST("val").labels.tolist())


def test_corrupt_jpeg_and_truncated_tar_are_skipped_and_counted(tmp_path):
    root = tmp_path / "shards"
    spec = write_id_shards(root, [10, 10, 10], sizes_json=False)
    with wds.TarWriter(str(root / "part-000003.tar")) as tar:
        for i in range(30, 35):
            data = b"\xff\xd8\xff\xe0 not a jpeg" if i == 32 else png(i)
            tar.write({"__key__": f"id{i:06d}", "jpg" if i == 32 else "png": data, "cls": str(i).encode()})
    spec = spec.replace("000002", "000003")
    damaged = root / "part-000001.tar"
    damaged.write_bytes(damaged.read_bytes()[:6000])

    loader = shard_loader(spec, TO_8PX, 4, 2, 1, 0, 0, train=False)
    seen = ids(loader.epoch(0))
    assert len(seen) == len(set(seen))
    assert set(range(0, 10)) | set(range(20, 32)) | set(range(33, 35)) <= set(seen)
    assert 32 not in seen and len(set(range(10, 20)) & set(seen)) < 10
    assert loader.skip_reasons == {"unreadable image": 1, "unreadable shard": 1}

    training = shard_loader(spec, AUGMENT, 4, 2, 1, 0, 0, shuffle_buffer=8)
    assert len(list(training.epoch(0))) == training.batches_per_epoch
    assert training.skipped >= 1


@pytest.mark.parametrize("train", [False, True])
def test_two_ranks_two_workers_see_every_sample_exactly_once(tmp_path, train):
    sizes = [12] * 8 if train else [9, 12, 5, 12, 12, 7, 1, 12, 12]
    spec = write_id_shards(tmp_path / "shards", sizes)
    seen, steps = [], []
    for rank in (0, 1):
        loader = shard_loader(spec, AUGMENT if train else TO_8PX, 4, 2, 2, rank, 3, train=train, shuffle_buffer=10)
        batches = list(loader.epoch(0))
        assert len(batches) == loader.batches_per_epoch
        seen += ids(batches)
        steps.append(len(batches))
        if train:
            assert loader.stream.plan.repeats(0) == (0, 0)
    assert sorted(seen) == list(range(sum(sizes)))
    if train:
        assert steps == [12, 12]


def test_uneven_shards_give_every_rank_the_same_steps_and_report_repeats_exactly(tmp_path):
    sizes = [30, 3, 17, 1, 25]
    spec = write_id_shards(tmp_path / "shards", sizes)
    for epoch in (0, 1):
        seen, steps, repeated, dropped = [], [], 0, 0
        for rank in (0, 1):
            loader = shard_loader(spec, AUGMENT, 4, 2, 2, rank, 0, batch_multiple=2)
            seen += ids(loader.epoch(epoch))
            steps.append(loader.batches_per_epoch)
            extra, left_out = loader.stream.plan.repeats(epoch)
            repeated, dropped = repeated + extra, dropped + left_out
        assert steps == [8, 8] and len(seen) == 2 * 8 * 4
        assert len(seen) - len(set(seen)) == repeated > 0
        assert sum(sizes) - len(set(seen)) == dropped > 0


@pytest.mark.parametrize("resampled", [False, True])
def test_shard_resume_continues_with_the_exact_next_batch(tmp_path, resampled):
    spec = write_id_shards(tmp_path / "shards", [7, 11, 9, 13, 8, 12])
    loader = shard_loader(spec, AUGMENT, 3, 2, 2, 1, 5, shuffle_buffer=7, resampled=resampled)
    full = list(loader.epoch(2))
    assert len(full) == loader.batches_per_epoch == 10
    for start in (3, 6):
        resumed = shard_loader(spec, AUGMENT, 3, 2, 2, 1, 5, shuffle_buffer=7, resampled=resampled)
        rest = list(resumed.epoch(2, start))
        assert len(rest) == len(full) - start
        for (a, la), (b, lb) in zip(full[start:], rest):
            assert torch.equal(la, lb) and torch.equal(a, b)
    assert ids(loader.epoch(3)) != ids(full), "each epoch has its own order"


def test_map_style_resume_continues_with_the_exact_next_batch(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(24):
        Image.new("RGB", (10, 12), (i * 10, 0, 0)).save(root / f"{i:02d}.png")
    (root / "99.jpg").write_bytes(b"\xff\xd8 broken")

    def loader():
        dataset = ImageFolder(root, AUGMENT)
        return EpochLoader(dataset, ResumableDistributedSampler(len(dataset), 5, 1, 0, seed=4), 2, CPU, STEP)

    whole = loader()
    full = list(whole.epoch(1))
    assert len(full) == 5 and whole.skipped == 1, "a file unreadable in a worker process is counted"
    rest = list(loader().epoch(1, 2))
    assert len(rest) == 3
    for (a, la), (b, lb) in zip(full[2:], rest):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_shard_list_matching_nothing_is_a_clear_start_up_error(tmp_path):
    with pytest.raises(DataError, match="matches no shard file"):
        shard_loader(f"{tmp_path}/none-{{000000..000003}}.tar", TO_8PX, 4, 0, 1, 0, 0)
    spec = write_id_shards(tmp_path / "shards", [4, 4])
    with pytest.raises(DataError, match="2 shard.* cannot be split over 2 process.* x 2 worker"):
        shard_loader(spec, TO_8PX, 2, 2, 2, 0, 0)


def test_pipe_urls_stream_the_same_samples_as_local_files(tmp_path):
    spec = write_id_shards(tmp_path / "shards", [5, 7, 6])
    piped = "::".join(f"pipe:cat {tmp_path}/shards/part-{s:06d}.tar" for s in range(3))
    sizes = str(tmp_path / "shards" / "sizes.json")
    local = shard_loader(spec, AUGMENT, 3, 0, 1, 0, 9, shuffle_buffer=4)
    remote = shard_loader(piped, AUGMENT, 3, 0, 1, 0, 9, shuffle_buffer=4, sizes_file=sizes)
    for (a, la), (b, lb) in zip(local.epoch(1), remote.epoch(1), strict=True):
        assert torch.equal(la, lb) and torch.equal(a, b)
    with pytest.raises(DataError, match="sample counts unknown"):
        shard_loader(piped, AUGMENT, 3, 0, 1, 0, 9)


@pytest.fixture
def id_server(tmp_path, monkeypatch):
    """Four shards of 12 id samples served over HTTP from this process (no wait before a new try)."""
    monkeypatch.setattr(shard_stream, "RETRY_DELAY_S", 0.0)
    write_id_shards(tmp_path / "shards", [12] * 4)
    with ShardServer(tmp_path / "shards") as server:
        yield server, server.url("part-{000000..000003}.tar"), str(tmp_path / "shards" / "sizes.json")


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http:// shards with curl, not installed")
def test_connection_cut_mid_shard_is_read_again_and_the_batches_are_unchanged(id_server, tmp_path):
    server, url, sizes = id_server
    for s in range(4):
        server.drop(f"part-{s:06d}.tar", after=9000)
    local = shard_loader(f"{tmp_path}/shards/part-{{000000..000003}}.tar", AUGMENT, 4, 0, 1, 0, 3, shuffle_buffer=10)
    remote = shard_loader(url, AUGMENT, 4, 0, 1, 0, 3, shuffle_buffer=10, sizes_file=sizes, retries=1)
    for (a, la), (b, lb) in zip(local.epoch(0), remote.epoch(0), strict=True):
        assert torch.equal(la, lb) and torch.equal(a, b)
    assert remote.skipped == 0 and all(server.requests[f"part-{s:06d}.tar"] == 2 for s in range(4))


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http:// shards with curl, not installed")
def test_shard_cut_for_good_costs_only_its_samples_not_yet_delivered(id_server):
    server, url, sizes = id_server
    server.drop("part-000001.tar", after=20000, times=-1)
    loader = shard_loader(url, TO_8PX, 5, 0, 1, 0, 0, train=False, sizes_file=sizes, retries=2)
    seen = ids(loader.epoch(0))
    delivered = [i for i in seen if 12 <= i < 24]
    assert sorted(set(seen) - set(delivered)) == sorted(i for i in seen if not 12 <= i < 24) == \
        [*range(12), *range(24, 48)], "every sample of the other shards, once"
    assert delivered == list(range(12, 12 + len(delivered))), "what came of the cut shard is its beginning"
    assert loader.skip_reasons == {"unreadable shard": 12 - len(delivered)}
    assert server.requests["part-000001.tar"] == 3, "read once and tried again twice"


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http:// shards with curl, not installed")
def test_every_rank_takes_its_planned_full_batches_when_a_shard_is_cut_for_good(id_server):
    server, url, sizes = id_server
    loaders = [shard_loader(url, AUGMENT, 4, 0, 2, rank, 1, shuffle_buffer=10, sizes_file=sizes) for rank in (0, 1)]
    cut = loaders[0].stream.plan.slot_shards(0, 0)[0]
    server.drop(f"part-{cut:06d}.tar", after=9000, times=-1)
    batches = [list(loader.epoch(0)) for loader in loaders]
    assert [len(b) for b in batches] == [loader.batches_per_epoch for loader in loaders] == [6, 6]
    assert all(len(labels) == 4 for rank in batches for _, labels in rank), "batches stay full"
    assert 0 < loaders[0].skip_reasons["unreadable shard"] <= 24, "the cut shard, in each of at most two passes"
    others = [i for s in loaders[1].stream.plan.slot_shards(0, 0) for i in range(12 * s, 12 * s + 12)]
    assert sorted(ids(batches[1])) == sorted(others) and loaders[1].skipped == 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http:// shards with curl, not installed")
def test_a_server_that_stays_down_stops_training_after_three_passes_naming_the_last_shard(id_server):
    server, url, sizes = id_server
    for s in range(4):
        server.drop(f"part-{s:06d}.tar", after=0, times=-1)
    loader = shard_loader(url, AUGMENT, 4, 0, 2, 1, 0, sizes_file=sizes, retries=1)
    with pytest.raises(DataError, match=r"^data.shards: no readable sample in 6 shards in a row; the last: "
                                        r"http://127.0.0.1:\d+/part-\d{6}.tar \(unreadable shard: "):
        next(iter(loader.epoch(0)))
    assert sum(server.requests.values()) == 12, "each of the 6 reads tried twice"


def test_shards_read_by_a_program_that_is_not_installed_are_a_start_up_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DataError, match=r"^data.shards: 'http://host/a-000000.tar' is read with 'curl', which is "
                                        r"not installed \(not on PATH\)$"):
        shard_loader("http://host/a-{000000..000001}.tar", TO_8PX, 4, 0, 1, 0, 0, samples_per_epoch=8)
    with pytest.raises(DataError, match="'pipe:aws s3 cp s3://b/a-000000.tar -' is read with 'aws'"):
        shard_loader("pipe:aws s3 cp s3://b/a-{000000..000001}.tar -", TO_8PX, 4, 0, 1, 0, 0, samples_per_epoch=8)


def test_labeled_reading_skips_a_sample_without_a_class_and_says_why():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    sample = {"__key__": "a", "png": buffer.getvalue()}
    skipped = decode_sample(sample, TO_8PX, RGB, 0, labeled=True)
    assert isinstance(skipped, Skipped) and skipped.reason == "no label"
    image, label = decode_sample(sample, TO_8PX, RGB, 0)
    assert label == -1 and image.dtype == torch.uint8 and image.shape == (3, 8, 8)
    assert decode_sample({**sample, "cls": b"2"}, TO_8PX, RGB, 0, labeled=True)[1] == 2


def test_max_side_shrinks_large_images_and_stores_small_ones_byte_for_byte(tmp_path, capsys):
    """--max-side N: a large JPEG becomes a JPEG of long side N at --quality (the bicubic resize of its pixels), a
    large 16-bit PNG a uint16 TIFF of the resized values, an RGBA PNG a PNG keeping alpha; small files are untouched."""
    src = tmp_path / "images" / "a"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((80, 60)))
    Image.fromarray(smooth).save(src / "big.jpg", quality=95)
    Image.fromarray(smooth[:20, :30]).save(src / "small.jpg", quality=95)
    deep = (np.arange(60 * 70, dtype=np.uint16).reshape(60, 70) * 15)
    Image.fromarray(deep).save(src / "deep.png")
    Image.fromarray(np.dstack([smooth, np.full((60, 80), 128, np.uint8)])).save(src / "alpha.png")
    out = tmp_path / "shards"
    for quality in (50, 95):
        assert shards_cli([str(tmp_path / "images"), str(out / str(quality)), "--max-side", "40", "--quality",
                           str(quality), "--no-progress"]) == 0
        assert "resized 3 of them" in capsys.readouterr().out
    stored = {q: {s["__key__"]: s for s in read_shard(str(out / str(q) / "train-000000.tar"), None)}
              for q in (50, 95)}
    samples = stored[95]
    assert samples["a/small"]["jpg"] == (src / "small.jpg").read_bytes()
    big = read_bytes(samples["a/big"]["jpg"], "jpg", ReadSpec(None))
    assert big.shape == (3, 30, 40) and len(stored[50]["a/big"]["jpg"]) < len(samples["a/big"]["jpg"])
    expected = resize(read_path(src / "big.jpg", ReadSpec(None)), (30, 40)).float()
    assert 10 * torch.log10(255 ** 2 / ((big.float() - expected) ** 2).mean()) > 30  # JPEG q95 of the resize
    deep_stored = read_bytes(samples["a/deep"]["tiff"], "tiff", ReadSpec(None))
    assert deep_stored.dtype == torch.uint16 and deep_stored.shape == (1, 34, 40)
    assert torch.equal(deep_stored, resize(read_path(src / "deep.png", ReadSpec(None)), (34, 40)))
    alpha = read_bytes(samples["a/alpha"]["png"], "png", ReadSpec(None))
    assert alpha.shape == (4, 30, 40) and torch.equal(alpha[3], torch.full((30, 40), 128, dtype=torch.uint8))


@pytest.mark.parametrize("args", [["--max-side", "0"], ["--max-side", "64", "--quality", "101"]])
def test_max_side_and_quality_out_of_range_are_refused(tmp_path, args):
    with pytest.raises(SystemExit):
        shards_cli(["embedded", str(tmp_path / "out"), *args])
