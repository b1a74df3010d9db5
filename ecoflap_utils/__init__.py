"""ecoflap_utils: ECoFLaP (Sung, Yoon, Bansal, ICLR 2024) step by step.

Data flows one way: adapter -> scores -> allocation -> pruning -> evaluation -> report.
"""
from .errors import CalibrationError, ModelNotAvailable, UserError
from .io import load_pruned, save_pruned
from .models import load_model
from .prune import PruneResult, prune

__all__ = ["load_model", "prune", "PruneResult", "save_pruned", "load_pruned", "UserError", "ModelNotAvailable",
           "CalibrationError"]
__version__ = "0.1.0"
