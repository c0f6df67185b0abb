"""Hugging Face `datasets` as a source: parquet written by `datasets` (16-bit gray PNG bytes, 4-band uint16 arrays)
reads and trains as the same images in a folder do, resumes mid-epoch exactly (map-style and streamed), probes,
converts to shards; a Hub name resolves from the local cache only; errors are one line."""

import io
import json
import shutil
import sys

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from conftest import TINY, run_and_resume
from PIL import Image

from mimswin.cli import main
from mimswin.data.batches import DeviceStep
from mimswin.data.hf import hf_images, hf_stream_loader
from mimswin.data.pixels import Skipped
from mimswin.data.readers import ReadSpec
from mimswin.data.stats import stats_of
from mimswin.errors import DataError

datasets = pytest.importorskip("datasets")

COUNT, CLASSES = 48, ["dark", "mid", "light"]
QUICK = [*TINY, "train.log_every=1", "data.batch_size=8", "train.keep_last=5"]


@pytest.fixture(scope="module", autouse=True)
def hf_cache(tmp_path_factory):
    """`datasets`' cache (parquet loaded map-style is converted there) in a scratch folder."""
    before = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = str(tmp_path_factory.mktemp("hf_cache"))
    yield
    datasets.config.HF_DATASETS_CACHE = before


def gray16(label: int, rng) -> np.ndarray:
    return (8000 * (label + 1) + rng.integers(0, 3000, (32, 32))).astype(np.uint16)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The same images twice: parquet written by `datasets` (train and validation splits of 16-bit gray PNG bytes; a
    train split of 4-band uint16 arrays) and as files in the dataset's order (PNG, .npy)."""
    root = tmp_path_factory.mktemp("hf")
    rng = np.random.default_rng(0)
    labels = [i % 3 for i in range(COUNT)]
    gray = [gray16(label, rng) for label in labels]
    bands = [(6000 * (label + 1) + rng.integers(0, 9000, (4, 32, 32))).astype(np.uint16) for label in labels]
    classes = datasets.ClassLabel(names=CLASSES)
    gray_features = datasets.Features({"image": datasets.Image(), "label": classes})
    (root / "gray").mkdir()
    for split, part in (("train", slice(0, 36)), ("val", slice(36, COUNT))):
        datasets.Dataset.from_dict({"image": [{"bytes": png(a), "path": None} for a in gray[part]],
                                    "label": labels[part]}, features=gray_features
                                   ).to_parquet(str(root / "gray" / f"{split}.parquet"))
    array_features = datasets.Features({"image": datasets.Array3D(shape=(4, 32, 32), dtype="uint16"),
                                        "label": classes})
    datasets.Dataset.from_dict({"image": bands, "label": labels}, features=array_features).to_parquet(
        str(root / "bands.parquet"))
    for kind in ("gray_files", "band_files"):
        (root / kind).mkdir()
    for i, (image, stack) in enumerate(zip(gray, bands)):
        Image.fromarray(image).save(root / "gray_files" / f"{i:03d}.png")
        np.save(root / "band_files" / f"{i:03d}.npy", stack)
    return root


def test_stats_of_parquet_equal_those_of_the_same_images_in_a_folder(written, capsys):
    gray = datasets.load_dataset("parquet", data_files=[str(written / "gray" / f"{split}.parquet")
                                                        for split in ("train", "val")], split="train")
    gray.save_to_disk(written / "gray_on_disk")
    for source, folder, channels in (("bands.parquet", "band_files", 4), ("gray_on_disk", "gray_files", 1)):
        from_hf, from_files = stats_of(str(written / source), samples=0), stats_of(str(written / folder), samples=0)
        assert from_hf.channels == channels and from_hf.images == COUNT
        assert from_hf.dtypes == {"uint16": COUNT}
        for key in ("mean", "std", "low", "high"):
            assert getattr(from_hf, key) == getattr(from_files, key), key
    disk = written / "on_disk"
    datasets.load_dataset("parquet", data_files=str(written / "bands.parquet"), split="train").save_to_disk(disk)
    assert main(["stats", str(disk), "--samples", "0"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{COUNT} image(s) of {disk}: 4 channel(s); pixel types uint16: {COUNT}")
    assert stats_of(str(written / "band_files"), samples=0).config_line() in printed


def test_16bit_pngs_keep_their_counts_and_arrays_their_dtype(written):
    gray = hf_images(str(written / "gray"), "train", "image", "label", None, ReadSpec(1))
    image, label = gray[0]
    rng = np.random.default_rng(0)
    assert image.dtype == torch.uint16 and label == 0
    np.testing.assert_array_equal(image[0].numpy(), gray16(0, rng))
    assert gray.classes == CLASSES and gray.labels().tolist() == [i % 3 for i in range(36)]
    bands = hf_images(str(written / "bands.parquet"), "train", "image", None, None, ReadSpec(4))
    image, label = bands[5]
    assert image.dtype == torch.uint16 and image.shape == (4, 32, 32) and label == -1
    np.testing.assert_array_equal(image.numpy(), np.load(written / "band_files" / "005.npy"))
    three = hf_images(str(written / "bands.parquet"), "train", "image", None, None, ReadSpec(3))
    assert three[0] == Skipped("wrong channels", f"{written / 'bands.parquet'}:train[0]",
                               "4 channel(s), data.channels=3")


def test_map_style_dataset_trains_as_its_files_do_and_resumes_mid_epoch_to_the_same_weights(written, tmp_path):
    args = [*QUICK, "data.channels=4", "data.mean=[0.2,0.2,0.2,0.2]", "data.std=[0.1,0.1,0.1,0.1]",
            "train.max_steps=5", "train.save_every=3"]
    pair = run_and_resume(tmp_path, [*args, f"data.hf={written / 'bands.parquet'}"], resume_at=3, steps=5)
    files = tmp_path / "files"
    assert main(["pretrain", *args, f"data.path={written / 'band_files'}", f"train.output_dir={files}"]) == 0
    files = safetensors.torch.load_file(str(files / "checkpoints" / "step_00000005" / "model.safetensors"))
    for key, tensor in pair.full_weights.items():  # 6 batches per epoch: resumed mid-epoch 0
        torch.testing.assert_close(pair.resumed_weights[key], tensor, rtol=0, atol=0, msg=key)
        torch.testing.assert_close(files[key], tensor, rtol=0, atol=0, msg=key)
    model = timm.create_model(f"local-dir:{pair.full / 'encoder'}", pretrained=True)
    assert timm.data.resolve_model_data_config(model)["input_size"] == (4, 32, 32)
    assert "images of 4 channel(s)" in (pair.full / "encoder" / "README.md").read_text()


def test_streamed_dataset_resumes_mid_window_and_across_epochs_to_the_same_weights(written, tmp_path):
    args = [*QUICK, f"data.hf={written / 'gray' / 'train.parquet'}", "data.hf_streaming=true",
            "data.num_workers=1", "data.shuffle_buffer=10", "data.mean=[0.25]", "data.std=[0.05]",
            "train.max_steps=6", "train.save_every=2"]
    pair = run_and_resume(tmp_path, args, resume_at=2, steps=6)  # 4 batches per epoch; step 2: rows 16.. (window 1)
    for key, tensor in pair.full_weights.items():
        torch.testing.assert_close(pair.resumed_weights[key], tensor, rtol=0, atol=0, msg=key)
    losses = [[r["loss"] for r in trainer.history] for trainer in (pair.full_trainer, pair.resumed_trainer)]
    assert losses[1] == losses[0][2:]


def test_stream_ranks_read_disjoint_rows_and_every_rank_gets_the_same_batch_count(written):
    seen = []
    for rank in range(2):
        loader = hf_stream_loader(str(written / "gray" / "train.parquet"), "train", "image", "label", lambda x: x,
                                  ReadSpec(1), DeviceStep([0.0], [1.0]), 4, 0, 2, rank, 0, torch.device("cpu"), 6,
                                  None)
        assert loader.batches_per_epoch == 4 and loader.source_size == 36
        rows = [row for batch in loader.rows for (row, _), _ in batch]
        assert len(rows) == 16
        seen.append({bytes(row["image"]["bytes"]) for row in rows})
    assert not seen[0] & seen[1]


def test_linear_probe_reads_the_train_and_validation_splits(written, tmp_path):
    run = tmp_path / "pre"
    assert main(["pretrain", *QUICK, f"data.hf={written / 'gray'}", "data.mean=[0.25]", "data.std=[0.05]",
                 "train.max_steps=2", f"train.output_dir={run}"]) == 0
    probe = tmp_path / "probe"
    assert main(["linprobe", "--config", "tiny_linprobe_cpu", "--from", str(run / "encoder"),
                 f"data.hf={written / 'gray'}", "data.num_workers=0", "train.progress=false", "knn.k=3",
                 "logistic.penalties=[0.01]", "data.labels_per_class=4", f"train.output_dir={probe}"]) == 0
    results = json.loads((probe / "results.json").read_text())
    assert results["train_samples"] == 12 and 0 <= results["last"]["val_top1"] <= 100


def test_shards_of_a_parquet_split_hold_its_images_byte_for_byte(written, tmp_path):
    out = tmp_path / "shards"
    assert main(["shards", str(written / "gray"), str(out), "--maxcount", "20", "--no-progress",
                 "--hf-split", "validation"]) == 0
    shards = sorted(out.glob("validation-*.tar"))
    assert len(shards) == 1
    assert stats_of(str(shards[0]), samples=0).mean == stats_of(str(written / "gray" / "val.parquet"),
                                                                 samples=0).mean
    assert (out / "classes.json").read_text().count("light") == 1


def test_a_hub_name_loads_from_the_local_cache_only(written, tmp_path):
    split = datasets.load_dataset("parquet", data_files=str(written / "gray" / "train.parquet"), split="train",
                                  cache_dir=str(tmp_path / "prepared"))
    prepared = next(p for p in (tmp_path / "prepared" / "parquet").glob("*/*/*") if p.is_dir())
    cached = tmp_path / "hub_cache" / "someone___ct_slices" / "default" / "0.0.0" / "abc"
    shutil.copytree(prepared, cached, ignore=shutil.ignore_patterns("*.lock"))
    for arrow in cached.glob("parquet-*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace("parquet-", "ct_slices-")))
    datasets.config.HF_DATASETS_CACHE, before = str(tmp_path / "hub_cache"), datasets.config.HF_DATASETS_CACHE
    try:
        images = hf_images("someone/ct_slices", "train", "image", "label", None, ReadSpec(1))
        assert len(images) == len(split) and torch.equal(images[3][0], hf_images(
            str(written / "gray"), "train", "image", "label", None, ReadSpec(1))[3][0])
        with pytest.raises(DataError, match="not in the local Hugging Face cache"):
            hf_images("someone/never_downloaded", "train", "image", "label", None, ReadSpec(1))
    finally:
        datasets.config.HF_DATASETS_CACHE = before


def test_bad_columns_splits_and_a_missing_extra_are_one_line_errors(written, tmp_path, capsys, monkeypatch):
    base = ["pretrain", *QUICK, "data.mean=[0.25]", "data.std=[0.05]", f"train.output_dir={tmp_path / 'run'}"]
    cases = {
        "data.hf_image_key=pixels": f"mimswin: error: data.hf_image_key: '{written / 'gray'}' has no column 'pixels' "
                                    "(columns: image, label)",
        "data.hf_split=dev": f"mimswin: error: data.hf_split: 'dev' is not a split of '{written / 'gray'}' (it has: "
                             "train, validation)",
    }
    for override, message in cases.items():
        assert main([*base, f"data.hf={written / 'gray'}", override]) == 2
        assert capsys.readouterr().err.strip() == message
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert main([*base, f"data.hf={written / 'gray'}"]) == 2
    assert capsys.readouterr().err.strip() == ('mimswin: error: data.hf: reading Hugging Face datasets needs the '
                                               '`datasets` package: pip install "mimswin[hf]"')
    assert not (tmp_path / "run" / "config.yaml").exists()
