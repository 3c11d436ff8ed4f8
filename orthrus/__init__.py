"""orthrus: lossless parallel token generation with dual-view diffusion drafting."""

from .api import Generation, GenerationStats, Orthrus, load
from .errors import OrthrusError
from .sampling import SamplingParams

__all__ = ["load", "Orthrus", "Generation", "GenerationStats", "SamplingParams", "OrthrusError"]
__version__ = "0.1.0"
