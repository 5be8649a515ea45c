"""Pure tensor transforms: no file access, no device. Every output tensor's producer lives here."""
from .linear import LINEAR_SPECS, LinearOutput, LinearSpec
from .moe import MOE_SPECS, MoeSpec, Output
from .translate import TRANSLATIONS, Translation

__all__ = ["MOE_SPECS", "MoeSpec", "Output", "LINEAR_SPECS", "LinearSpec", "LinearOutput", "TRANSLATIONS",
           "Translation"]
