"""The depth sweep: (variant, depth, seed) runs, each recorded and saved as it finishes.

config.py (the options, validated once; the runs they plan) -> measure.py (one run trained,
recorded, measured into its row) -> store.py (the sweep folder: rows, run files, the lock,
resume; load_sweep) -> executor.py (one set-up, then local workers or torchrun ranks);
result.py: SweepResult, the finished runs as data for the reports.
"""

from gradscope.lab.sweep.config import (
    DEFAULT_DEPTH_COUNT,
    DEFAULT_VARIANTS,
    RunSpec,
    SweepConfig,
    SweepError,
    default_depths,
    plan_runs,
)
from gradscope.lab.sweep.executor import SweepProgress, reports_here, run_sweep, under_torchrun
from gradscope.lab.sweep.measure import run_one
from gradscope.lab.sweep.result import SweepResult, cell_verdict, deepest_runs
from gradscope.lab.sweep.store import (
    RUN_COLUMNS,
    finished_runs,
    load_sweep,
    prepare_out,
    read_config,
    scan_runs,
    store_run,
    sweep_lock,
    write_outputs,
)

__all__ = [
    "DEFAULT_DEPTH_COUNT",
    "DEFAULT_VARIANTS",
    "RUN_COLUMNS",
    "RunSpec",
    "SweepConfig",
    "SweepError",
    "SweepProgress",
    "SweepResult",
    "cell_verdict",
    "deepest_runs",
    "default_depths",
    "finished_runs",
    "load_sweep",
    "plan_runs",
    "prepare_out",
    "read_config",
    "reports_here",
    "run_one",
    "run_sweep",
    "scan_runs",
    "store_run",
    "sweep_lock",
    "under_torchrun",
    "write_outputs",
]
