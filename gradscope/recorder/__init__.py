"""The recorder: hooks on any nn.Module that record exact per-layer gradient, activation and
update statistics into a long-form frame (see gradscope.schema). One job per file:

- recorder.py  the front: settings, attach/detach, the step schedule, results; `watch`
- hooks.py     which modules are watched, forward and output-gradient hooks, the registry
- capture.py   one step's calls as typed records, and its one host transfer
- backends.py  the statistics of a call: C kernels or torch ops, same schema, same order
- reduce.py    per-layer reduction of a step's calls, and the derived rows
- merge.py     merging over ranks: one packed all-reduce per reduction
- rows.py      layouts, spilling to Parquet, to_frame()
"""

from gradscope.recorder.errors import NonfiniteEvent, RecorderError
from gradscope.recorder.hooks import block_fqns
from gradscope.recorder.recorder import Recorder, watch

__all__ = ["NonfiniteEvent", "Recorder", "RecorderError", "block_fqns", "watch"]
