"""Encoders (timm models with masked forwards), MIM decoders and the methods that tie them to a loss."""

from mimswin.models.factory import build_method
from mimswin.models.loss import MIMOutput, masked_loss
from mimswin.models.mae import MAE
from mimswin.models.simmim import SimMIM

__all__ = ["MAE", "MIMOutput", "SimMIM", "build_method", "masked_loss"]
