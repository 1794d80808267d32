"""secondorder: practical second-order optimizers for PyTorch."""

from .optim.shampoo import Shampoo
from .optim.soap import SOAP
from .optim.sonew import SONew

__all__ = ["Shampoo", "SONew", "SOAP"]
__version__ = "0.1.0"
