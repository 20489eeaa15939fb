"""Lightning callbacks that measure training stability, warn before collapse, and act."""

__version__ = "0.1.0"
