"""Image sources (embedded MNIST-5k, image folders), MIM transforms and resumable per-rank loaders."""

from mimswin.data.build import build_pretrain_data
from mimswin.data.sources import EmbeddedMNIST, ImageFolder

__all__ = ["EmbeddedMNIST", "ImageFolder", "build_pretrain_data"]
