"""gradscope: gradient-flow diagnostics for PyTorch.

Example:
    >>> import gradscope as gs
    >>> model = gs.build_model("preln", depth=4)
"""

from gradscope.diagnose import Verdict, diagnose
from gradscope.lab.data import DataError, Dataset, load_dataset
from gradscope.lab.models import build_model, build_named
from gradscope.recorder import NonfiniteEvent, Recorder, RecorderError, watch
from gradscope.remedies import try_remedies
from gradscope.runs import Run, RunError, load_run
from gradscope.version import __version__ as __version__

__all__ = [
    "DataError",
    "Dataset",
    "NonfiniteEvent",
    "Recorder",
    "RecorderError",
    "Run",
    "RunError",
    "Verdict",
    "build_model",
    "build_named",
    "diagnose",
    "load_dataset",
    "load_run",
    "try_remedies",
    "watch",
]
