"""rmoe: Mixture-of-Experts language models with pluggable (and layerwise recurrent) routers."""

from rmoe.errors import RmoeError
from rmoe.model.config import ModelConfig
from rmoe.model.decoder import MoeLM, MoeLMOutput

__all__ = ["ModelConfig", "MoeLM", "MoeLMOutput", "RmoeError"]
__version__ = "0.3.0"  # CHANGELOG.md says what changed
