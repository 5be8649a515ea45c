"""The tool's version: in its own module so every layer can name it without importing the package root."""
from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
