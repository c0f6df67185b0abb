"""Crops resized on the device (`data.resize: device`) and JPEGs decoded there (`data.decode: device`): the same boxes
and flips as the worker path, the same pixels up to the worker's rounding, exact resume, and the config's refusals."""

import io
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import RGB, TINY, run_and_resume
from PIL import Image

from mimswin.config import FinetuneConfig, PretrainConfig, load_config
from mimswin.data import device_crop
from mimswin.data.batches import DeviceStep, collate_samples, ready_batches
from mimswin.data.build import build_pretrain_data, resize_on_device
from mimswin.data.device_crop import CropBatch, DeviceCrop, Encoded, resize_crops
from mimswin.data.pixels import SampleError
from mimswin.data.readers import ReadSpec, read_bytes
from mimswin.data.transforms import pretrain_transform, resize
from mimswin.errors import ConfigError, DataError

CPU = torch.device("cpu")
SIZE = (24, 32)


def photo_like(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth colour fields with texture: H x W x C uint8 that compresses and resizes like a photograph."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, channels), dtype=np.uint8)
    field = np.asarray(Image.fromarray(small.squeeze(-1) if channels == 1 else small).resize((width, height),
                                                                                           Image.BICUBIC))
    field = field.reshape(height, width, channels).astype(np.int16)
    return np.clip(field + rng.integers(-12, 13, field.shape), 0, 255).astype(np.uint8)


def jpeg_bytes(array: np.ndarray, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(out, "JPEG", **options)
    return out.getvalue()


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    return float(10 * torch.log10(peak ** 2 / ((a - b) ** 2).mean()))


def device_batch(images, seeds, crop) -> CropBatch:
    items = []
    for image, seed in zip(images, seeds):
        torch.manual_seed(seed)
        items.append((crop(image), 0))
    return collate_samples(items).images


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.int16, torch.float32])
def test_device_crop_draws_the_boxes_and_flips_of_the_worker_crop(dtype):
    """Per seed, the worker's output is exactly the device crop's cut, resized and flipped as the device was told."""
    image = torch.from_numpy(photo_like(40, 60).transpose(2, 0, 1).copy())
    image = image.to(dtype) if dtype != torch.float32 else image.float() / 255
    worker, device = pretrain_transform(SIZE, [0.2, 1.0], 0.5), DeviceCrop(SIZE, [0.2, 1.0], 0.5)
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        expected = worker(image)
        torch.manual_seed(seed)
        pending = device(image)
        cut = pending.source.permute(2, 0, 1)
        assert pending.box == (0, 0, *cut.shape[1:])
        got = resize(cut, SIZE)
        torch.testing.assert_close(got.flip(-1) if pending.flip else got, expected, rtol=0, atol=0)
        flips.add(pending.flip)
    assert flips == {True, False}


@pytest.mark.parametrize("channels,dtype", [(3, torch.uint8), (1, torch.uint16), (4, torch.int16), (2, torch.float32)])
def test_device_resize_equals_the_worker_resize_up_to_its_rounding(channels, dtype):
    """PSNR against the worker path's output (which rounds integer pixels to their dtype) >= 50 dB."""
    images = [torch.from_numpy(photo_like(h, w, channels, seed).transpose(2, 0, 1).copy())
              for seed, (h, w) in enumerate([(40, 60), (60, 40), (33, 77), (24, 32)])]
    if dtype == torch.uint16:
        images = [image.to(torch.int32).mul(257).to(torch.uint16) for image in images]
    elif dtype == torch.int16:
        images = [(image.to(torch.int16) - 128) * 200 for image in images]
    elif dtype == torch.float32:
        images = [image.float() / 255 for image in images]
    step = DeviceStep([0.0] * channels, [1.0] * channels, SIZE)
    worker = pretrain_transform(SIZE, [0.2, 1.0], 0.5)
    expected = []
    for seed, image in enumerate(images):
        torch.manual_seed(seed)
        expected.append(worker(image))
    batch = device_batch(images, range(len(images)), DeviceCrop(SIZE, [0.2, 1.0], 0.5))
    got = step(batch, CPU)
    reference = DeviceStep([0.0] * channels, [1.0] * channels)(torch.stack(expected), CPU)
    assert got.shape == (len(images), channels, *SIZE)
    assert psnr(got, reference) >= 50
    if dtype != torch.float32:  # integer sources stay within their range, as the worker path clamps
        low = -32768 / 32767 if dtype == torch.int16 else 0.0
        assert got.min() >= low and got.max() <= 1.0


def test_jpegs_decoded_on_the_device_give_the_pixels_of_the_workers_decode():
    """A batch mixing deferred JPEGs (gray read as RGB too) and decoded PNG cuts: the same model input as when the
    workers decode everything."""
    files = [(jpeg_bytes(photo_like(50, 70, 3, 1), quality=90), ".jpg"),
             (jpeg_bytes(photo_like(64, 48, 1, 2), quality=85), ".jpg"),
             (jpeg_bytes(photo_like(40, 40, 3, 3), quality=95, subsampling=0), ".jpg")]
    png = io.BytesIO()
    Image.fromarray(photo_like(30, 50, 3, 4)).save(png, "PNG")
    files.append((png.getvalue(), ".png"))
    deferred = [read_bytes(data, ext, ReadSpec(3, defer_jpeg=True)) for data, ext in files]
    decoded = [read_bytes(data, ext, ReadSpec(3)) for data, ext in files]
    assert [isinstance(item, Encoded) for item in deferred] == [True, True, True, False]
    crop = DeviceCrop(SIZE, [0.3, 1.0], 0.5)
    on_device = device_batch(deferred, range(4), crop)
    in_workers = device_batch(decoded, range(4), crop)
    assert on_device.lengths.tolist()[:3] == [len(data) for data, _ in files[:3]]
    assert on_device.nbytes < in_workers.nbytes
    torch.testing.assert_close(resize_crops(on_device, SIZE, 3, CPU), resize_crops(in_workers, SIZE, 3, CPU),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode,options", [("RGB", {"quality": 90}), ("RGB", {"quality": 95, "subsampling": 0}),
                                          ("L", {"quality": 80}), ("RGB", {"quality": 90, "progressive": True})])
def test_jpeg_reader_gives_pils_pixels(mode, options):
    array = photo_like(45, 67, 3 if mode == "RGB" else 1)
    data = jpeg_bytes(array, **options)
    with Image.open(io.BytesIO(data)) as image:
        expected = np.asarray(image)
    expected = expected[None] if expected.ndim == 2 else expected.transpose(2, 0, 1)
    got = read_bytes(data, ".jpg", ReadSpec(None))
    assert torch.equal(got, torch.from_numpy(np.array(expected)))


def test_cmyk_jpegs_and_wrong_channel_counts_stay_with_the_workers():
    cmyk = io.BytesIO()
    Image.fromarray(photo_like(20, 30)).convert("CMYK").save(cmyk, "JPEG")
    assert not isinstance(read_bytes(cmyk.getvalue(), ".jpg", ReadSpec(3, defer_jpeg=True)), Encoded)
    rgb = jpeg_bytes(photo_like(20, 30))
    with pytest.raises(Exception, match="wrong channels"):
        read_bytes(rgb, ".jpg", ReadSpec(1, defer_jpeg=True))


def write_jpeg_folder(root, count):
    for index in range(count):
        folder = root / f"c{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:03d}.jpg").write_bytes(jpeg_bytes(photo_like(40 + index % 7, 50 + index % 5, 3, index)))
    return root


def test_device_paths_resume_exactly(tmp_path):
    """Crops decoded and resized on the device: kill-free mid-run resume reproduces the uninterrupted weights."""
    folder = write_jpeg_folder(tmp_path / "photos", 48)
    common = TINY + RGB + [f"data.path={folder}", "data.decode=device", "train.max_steps=6", "train.save_every=3",
                           "train.keep_last=5", "data.num_workers=2", "train.log_every=1"]
    _, _, trainer, _, a, b = run_and_resume(tmp_path / "runs", common, resume_at=3, steps=6)
    assert trainer.state.step == 6
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_auto_resizes_on_a_gpu_and_in_the_workers_on_a_cpu(tmp_path):
    cfg = load_config(PretrainConfig, [], [])
    assert cfg.data.resize == "auto" and cfg.data.decode == "worker"
    assert not resize_on_device(cfg.data, CPU) and resize_on_device(cfg.data, torch.device("cuda"))
    cfg.data.decode = "device"
    assert resize_on_device(cfg.data, CPU)
    cfg = load_config(PretrainConfig, [], ["data.resize=device", "data.batch_size=4", "data.num_workers=0"])
    images, _ = next(iter(build_pretrain_data(cfg.data, (28, 28), 1, 0, 0, CPU).epoch(0)))
    assert images.shape == (4, 3, 28, 28)


@pytest.mark.parametrize("program,overrides,key", [
    (PretrainConfig, ["data.resize=worker", "data.decode=device"], "data.decode"),
    (PretrainConfig, ["data.resize=gpu"], "data.resize"),
    (PretrainConfig, ["data.decode=nvjpeg"], "data.decode"),
    (FinetuneConfig, ["data.resize=device"], "data.resize"),
])
def test_config_refuses_device_settings_that_cannot_hold(program, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(program, [], overrides)


def test_truncated_jpegs_are_left_to_the_workers_which_skip_them():
    data = jpeg_bytes(photo_like(40, 40))
    with pytest.raises(SampleError, match="unreadable image"):
        read_bytes(data[:len(data) // 2], ".jpg", ReadSpec(3, defer_jpeg=True))


def test_jpegs_the_device_cannot_decode_are_dropped_with_their_labels_and_counted(monkeypatch):
    """A header that parsed over a body the device decoder refuses: the batch goes on without it, its label too."""
    good, bad = jpeg_bytes(photo_like(40, 40, 3, 1)), jpeg_bytes(photo_like(30, 50, 3, 2))
    real = device_crop.decode_jpeg

    def strict(data, **kwargs):
        blobs = data if isinstance(data, list) else [data]
        if any(blob.numel() == len(bad) for blob in blobs):
            raise RuntimeError("decode_jpeg: corrupt")
        return real(data, **kwargs)

    monkeypatch.setattr(device_crop, "decode_jpeg", strict)
    crop = DeviceCrop(SIZE, [0.3, 1.0], 0.0)
    png = io.BytesIO()
    Image.fromarray(photo_like(30, 40, 3, 3)).save(png, "PNG")
    items = [(crop(read_bytes(data, ext, ReadSpec(3, defer_jpeg=True))), label)
             for label, (data, ext) in enumerate([(good, ".jpg"), (bad, ".jpg"), (png.getvalue(), ".png"),
                                                  (bad, ".jpg")])]
    skips = Counter()
    (images, labels), = ready_batches([collate_samples(items)], DeviceStep([0.0] * 3, [1.0] * 3, SIZE), CPU, skips)
    assert labels.tolist() == [0, 2] and images.shape == (2, 3, *SIZE)
    assert skips == Counter({"unreadable image": 2})
    kept = collate_samples([items[0], items[2]]).images
    torch.testing.assert_close(images, resize_crops(kept, SIZE, 3, CPU))
    with pytest.raises(DataError, match="a whole batch"):
        list(ready_batches([collate_samples([items[1], items[3]])], DeviceStep([0.0] * 3, [1.0] * 3, SIZE), CPU,
                           Counter()))
