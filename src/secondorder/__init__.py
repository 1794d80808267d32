"""secondorder: practical second-order optimizers for PyTorch."""

from .optim.shampoo import Shampoo

__all__ = ["Shampoo"]
__version__ = "0.1.0"
