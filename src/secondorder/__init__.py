"""secondorder: practical second-order optimizers for PyTorch."""

from .batching import AdaptiveBatchSize
from .optim.adagradnorm import AdaGradNorm
from .optim.shampoo import Shampoo
from .optim.sonew import SONew

__all__ = ["Shampoo", "SONew", "AdaGradNorm", "AdaptiveBatchSize"]
__version__ = "0.1.0"
