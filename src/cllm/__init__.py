"""cllm: the Crystalline Lattice Language Model."""
from .config import ModelConfig

__version__ = "0.1.0"
__all__ = ["ModelConfig", "__version__"]
