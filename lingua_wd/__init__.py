"""lingua_wd: tune on a small model, transfer to a wide one, and measure why it transfers."""

__version__ = "0.1.0"
