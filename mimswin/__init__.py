"""mimswin: masked image modeling pretraining of timm ViT and Swin encoders under accelerate."""

__version__ = "0.1.0"
