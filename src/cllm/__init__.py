"""cllm: the Crystalline Lattice Language Model."""
from .config import ModelConfig
from .model import Model

__version__ = "0.1.0"
__all__ = ["Model", "ModelConfig", "__version__"]
