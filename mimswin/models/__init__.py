"""Encoders (timm models with masked forwards), MIM decoders and the methods that tie them to a loss."""

from mimswin.models.methods import MAE, MIMOutput, SimMIM, build_method

__all__ = ["MAE", "MIMOutput", "SimMIM", "build_method"]
