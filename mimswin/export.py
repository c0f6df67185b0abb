"""Public import path of exported encoders: `from mimswin.export import load_exported_timm` (mimswin.runs.export)."""

from mimswin.runs.export import export_encoder, load_exported_timm, read_export

__all__ = ["export_encoder", "load_exported_timm", "read_export"]
