"""secondorder: practical second-order optimizers for PyTorch."""

from .batching import AdaptiveBatchSize
from .optim.adagradnorm import AdaGradNorm
from .optim.adahessian import AdaHessian
from .optim.mfac import MFAC
from .optim.mkor import MKOR
from .optim.muon import Muon
from .optim.scale import SCALE
from .optim.shampoo import RootFailureError, Shampoo
from .optim.soap import SOAP
from .optim.sonew import SONew

__all__ = [
    "Shampoo",
    "SONew",
    "SOAP",
    "AdaHessian",
    "MFAC",
    "MKOR",
    "SCALE",
    "Muon",
    "AdaGradNorm",
    "AdaptiveBatchSize",
    "RootFailureError",
]
__version__ = "0.1.0"
