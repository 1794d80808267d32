"""secondorder: practical second-order optimizers for PyTorch."""

from .optim.mkor import MKOR
from .optim.shampoo import Shampoo
from .optim.sonew import SONew

__all__ = ["Shampoo", "SONew", "MKOR"]
__version__ = "0.1.0"
