"""gradscope: gradient-flow diagnostics for PyTorch.

Example:
    >>> import gradscope as gs
    >>> model = gs.build_model("preln", depth=4)
"""

from gradscope.diagnose import Verdict, diagnose
from gradscope.lab.data import DataError, Dataset, load_dataset
from gradscope.lab.models import build_model, build_named
from gradscope.recorder import NonfiniteEvent, Recorder, RecorderError, watch

__all__ = [
    "DataError",
    "Dataset",
    "NonfiniteEvent",
    "Recorder",
    "RecorderError",
    "Verdict",
    "build_model",
    "build_named",
    "diagnose",
    "load_dataset",
    "watch",
]

__version__ = "0.1.0"
