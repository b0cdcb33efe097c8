"""normbench: which normalization layer, at which batch size, and why."""

__version__ = "0.1.0"
