"""Training: the configuration (:mod:`.config`), the trainer (:mod:`.trainer`) and the gradient
averaging data-parallel runs need (:mod:`.distributed`)."""

from .config import RUN_CONFIG, DataConfig, SparsePOConfig
from .trainer import SparsePOTrainer

__all__ = ["RUN_CONFIG", "DataConfig", "SparsePOConfig", "SparsePOTrainer"]
