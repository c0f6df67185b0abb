"""The pixel contract: files become C x H x W tensors in their own dtype, nothing stretched per image, and the device
step turns any batch into the model's input; 8-bit images behave as the PIL path did."""

import io

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from mimswin.data.batches import DeviceStep
from mimswin.data.build import EpochLoader
from mimswin.data.pixels import SampleError, promote, stack_samples, to_float
from mimswin.data.readers import ReadSpec, read_bytes, read_path
from mimswin.data.sampler import ResumableDistributedSampler
from mimswin.data.sources import ImageFolder
from mimswin.data.transforms import CenterView, RandomResizedCrop, eval_transform, pretrain_transform, resize

CPU = torch.device("cpu")


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def tiff_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    return buffer.getvalue()


def test_a_one_count_difference_in_a_16_bit_file_reaches_the_model(tmp_path):
    pixels = np.full((8, 8), 30000, np.uint16)
    pixels[:, 4:] += 1
    (tmp_path / "scan.png").write_bytes(png_bytes(pixels))
    folder = ImageFolder(tmp_path, eval_transform((8, 8)), ReadSpec(1))
    loader = EpochLoader(folder, ResumableDistributedSampler(1, 1, shuffle=False), 0, CPU, DeviceStep([0.5], [0.25]))
    (images, _), = list(loader.epoch(0))
    assert images.dtype == torch.float32
    left, right = images[0, 0, :, :4], images[0, 0, :, 4:]
    torch.testing.assert_close(right - left, torch.full_like(left, 1 / 65535 / 0.25), rtol=1e-3, atol=0)
    assert images[0, 0, 0, 0].item() == pytest.approx((30000 / 65535 - 0.5) / 0.25, rel=1e-6)


def test_constant_16_bit_images_of_different_values_stay_different():
    step = DeviceStep([0.5], [0.25])
    low, high = (read_bytes(png_bytes(np.full((6, 6), v, np.uint16)), "png", ReadSpec(1)) for v in (1000, 50000))
    assert low.dtype == high.dtype == torch.uint16 and low.unique().tolist() == [1000]
    inputs = step(torch.stack([low, high]), CPU)
    assert inputs[0].unique().item() == pytest.approx((1000 / 65535 - 0.5) / 0.25, rel=1e-5)
    assert inputs[1].unique().item() == pytest.approx((50000 / 65535 - 0.5) / 0.25, rel=1e-5)


def test_eight_bit_images_give_what_the_pil_path_gave():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)
    tensor = read_bytes(png_bytes(rgb), "png", ReadSpec(3))
    pil = Image.fromarray(rgb)
    step = DeviceStep([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    old_normalize = T.Compose([T.ToTensor(), T.Normalize(step.mean.flatten().tolist(), step.std.flatten().tolist())])
    torch.testing.assert_close(step(tensor[None], CPU)[0], old_normalize(pil))  # scaling: exactly as before

    old = T.Compose([T.RandomResizedCrop(28, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
                     T.RandomHorizontalFlip(0.5), T.PILToTensor()])
    new = pretrain_transform((28, 28), [0.2, 1.0], 0.5)
    differences = []
    for seed in range(20):
        torch.manual_seed(seed)
        before = old(pil).float()
        torch.manual_seed(seed)
        after = new(tensor)
        assert after.dtype == torch.uint8
        differences.append((after.float() - before).abs())
    # same crop boxes and flips; bicubic resampling by torchvision vs PIL differs by a fraction of a level
    assert torch.stack(differences).mean() < 0.5
    old_view = T.Compose([T.Resize(28, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(28), T.PILToTensor()])
    assert (eval_transform((28, 28))(tensor).float() - old_view(pil).float()).abs().mean() < 0.5


def test_sixteen_bit_resize_rounds_and_clamps_instead_of_wrapping_around():
    edge = torch.zeros(1, 8, 8, dtype=torch.uint16)
    edge[..., 4:] = 65535
    resized = resize(edge, (5, 5))
    reference = resize(edge.float(), (5, 5)).round().clamp(0, 65535)
    assert resized.dtype == torch.uint16 and torch.equal(resized.to(torch.int32), reference.to(torch.int32))
    signed = torch.zeros(1, 8, 8, dtype=torch.int16)
    signed[..., 4:] = 32767
    expected = resize(signed.float(), (5, 5)).round().clamp(-32768, 32767)
    assert torch.equal(resize(signed, (5, 5)).float(), expected)  # torchvision's own int16 path gives -31252 here


def test_crops_of_a_non_square_output_keep_its_aspect_on_average():
    torch.manual_seed(0)
    crop = RandomResizedCrop((16, 48), [0.2, 1.0])
    boxes = [T.RandomResizedCrop.get_params(torch.zeros(1, 300, 300), crop.scale, crop.ratio) for _ in range(400)]
    aspects = np.array([w / h for _, _, h, w in boxes])
    assert 2.4 < np.exp(np.log(aspects).mean()) < 3.6
    image = torch.arange(300 * 300, dtype=torch.float32).view(1, 300, 300)
    assert crop(image).shape == (1, 16, 48) and CenterView((16, 48), 0.875)(image).shape == (1, 16, 48)


def test_mixed_dtypes_in_a_batch_are_promoted_not_truncated():
    small = torch.full((1, 2, 2), 255, dtype=torch.uint8)
    deep = torch.full((1, 2, 2), 65535, dtype=torch.uint16)
    batch = stack_samples([small, deep])
    assert batch.dtype == torch.uint16 and torch.equal(to_float(batch[0]), to_float(small))
    floats = stack_samples([small, torch.full((1, 2, 2), 0.25)])
    assert floats.dtype == torch.float32 and floats[0].unique().item() == 1.0 and floats[1].unique().item() == 0.25
    signed = promote(torch.full((1, 1, 1), -32767, dtype=torch.int16), torch.float32)
    assert signed.item() == -1.0


@pytest.mark.parametrize("name, data, spec, shape, dtype", [
    ("2-D array", npy_bytes(np.zeros((5, 7), np.float32)), ReadSpec(1), (1, 5, 7), torch.float32),
    ("hwc array", npy_bytes(np.zeros((5, 7, 13), np.float64)), ReadSpec(13), (13, 5, 7), torch.float32),
    ("chw array", npy_bytes(np.zeros((13, 5, 7), np.uint16)), ReadSpec(13), (13, 5, 7), torch.uint16),
    ("layout set", npy_bytes(np.zeros((13, 13, 13), np.int16)), ReadSpec(13, "chw"), (13, 13, 13), torch.int16),
    ("planar tiff", tiff_bytes(np.zeros((13, 6, 9), np.float32)), ReadSpec(13), (13, 6, 9), torch.float32),
    ("interleaved tiff", tiff_bytes(np.zeros((6, 9, 4), np.uint16), planarconfig="contig", photometric="minisblack"),
     ReadSpec(4), (4, 6, 9), torch.uint16),
    ("gray to rgb", png_bytes(np.zeros((6, 9), np.uint8)), ReadSpec(3), (3, 6, 9), torch.uint8),
    ("16-bit png", png_bytes(np.zeros((6, 9), np.uint16)), ReadSpec(1), (1, 6, 9), torch.uint16),
    ("rgba png as rgba", png_bytes(np.zeros((6, 9, 4), np.uint8)), ReadSpec(4), (4, 6, 9), torch.uint8),
])
def test_readers_give_channels_first_tensors_in_the_files_own_dtype(name, data, spec, shape, dtype):
    ext = "tiff" if "tiff" in name else "png" if "png" in name or "rgb" in name else "npy"
    image = read_bytes(data, ext, spec)
    assert image.shape == shape and image.dtype == dtype


def test_values_survive_reading_exactly():
    bands = np.random.default_rng(0).random((13, 6, 9)).astype(np.float32)
    assert np.array_equal(read_bytes(tiff_bytes(bands), "tif", ReadSpec(13)).numpy(), bands)
    assert np.array_equal(read_bytes(npy_bytes(bands.transpose(1, 2, 0)), "npy", ReadSpec(13)).numpy(), bands)
    counts = np.random.default_rng(1).integers(0, 65536, (6, 9), dtype=np.uint16)
    assert np.array_equal(read_bytes(png_bytes(counts), "png", ReadSpec(1)).numpy()[0], counts)
    big_endian = bands.astype(">f8")
    assert np.array_equal(read_bytes(npy_bytes(big_endian), "npy", ReadSpec(13)).numpy(), bands)
    translucent = np.zeros((2, 2, 4), np.uint8)
    translucent[..., 0], translucent[..., 3] = 200, 128
    over_white = read_bytes(png_bytes(translucent), "png", ReadSpec(3))
    assert over_white[:, 0, 0].tolist() == [227, 127, 127]  # round(200 a + 255 (1 - a)), a = 128 / 255


@pytest.mark.parametrize("data, ext, spec, reason", [
    (png_bytes(np.zeros((4, 4, 3), np.uint8)), "png", ReadSpec(1), "wrong channels"),
    (npy_bytes(np.zeros((4, 4), np.float32)), "npy", ReadSpec(13), "wrong channels"),
    (npy_bytes(np.zeros((13, 20, 20), np.float32)), "npy", ReadSpec(1), "wrong channels"),
    (npy_bytes(np.full((2, 4, 4), np.nan, np.float32)), "npy", ReadSpec(2), "non-finite values"),
    (npy_bytes(np.zeros((4, 4), np.int32)), "npy", ReadSpec(1), "unsupported pixels"),
    (npy_bytes(np.zeros((1, 2, 4, 4), np.float32)), "npy", ReadSpec(2), "unsupported pixels"),
    (npy_bytes(np.zeros((5, 5, 5), np.float32)), "npy", ReadSpec(5), "ambiguous layout"),
    (b"not an array", "npy", ReadSpec(1), "unreadable image"),
    (b"II*\x00 broken tiff", "tif", ReadSpec(1), "unreadable image"),
])
def test_files_the_config_cannot_use_are_refused_with_the_reason(data, ext, spec, reason):
    with pytest.raises(SampleError) as refused:
        read_bytes(data, ext, spec)
    assert refused.value.reason == reason


def jpeg_bytes(shape=(40, 50, 3)) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


@pytest.mark.parametrize("data, ext, said", [
    (b"", "jpg", "empty file (0 bytes)"),
    (b"", "tif", "empty file (0 bytes)"),
    (b"", "npy", "empty file (0 bytes)"),
    (b"<html><body>Not Found</body></html>", "png", "not an image: 35 bytes starting b'<html><body>Not '"),
    (b"version https://git-lfs", "tif", "not an image: 23 bytes starting b'version https://'"),
    (jpeg_bytes()[:20], "jpg", "a truncated or damaged JPEG (20 bytes): its header cannot be read"),
    (png_bytes(np.zeros((4, 4, 3), np.uint8))[:12], "png", "a truncated or damaged PNG (12 bytes)"),
    (jpeg_bytes()[:400], "jpg", "a truncated or damaged JPEG (400 bytes): "),
])
@pytest.mark.parametrize("defer_jpeg", [False, True])
def test_an_unreadable_file_is_said_to_be_empty_not_an_image_or_truncated(data, ext, said, defer_jpeg):
    with pytest.raises(SampleError) as refused:
        read_bytes(data, ext, ReadSpec(3, defer_jpeg=defer_jpeg))
    assert refused.value.reason == "unreadable image" and said in refused.value.detail
    assert "BytesIO" not in str(refused.value) and " at 0x" not in str(refused.value)


def test_a_missing_file_is_a_sample_error_too(tmp_path):
    with pytest.raises(SampleError, match="unreadable image"):
        read_path(tmp_path / "gone.png", ReadSpec(1))


def test_device_step_refuses_a_batch_of_another_channel_count():
    from mimswin.errors import DataError

    with pytest.raises(DataError, match="reads 3 channel"):
        DeviceStep([0.5] * 3, [0.2] * 3)(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), CPU)
