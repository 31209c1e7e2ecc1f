"""tidar: single-pass draft-and-verify decoding (TiDAR) for autoregressive language models."""

__version__ = "0.1.0"
