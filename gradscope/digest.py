"""Frame digests: a frame's fingerprint (column names, dtypes, exact values), and the opt-in
log of every frame a recorder makes, for checking that a change leaves recordings identical.

With ``GRADSCOPE_FRAME_DIGEST=<file>`` set, each ``Recorder.to_frame()`` appends one JSON
line to the file, in child processes too (they inherit the variable): see
``tests/conftest.py`` (which names the line's owner) and ``tools/frames_compare.py``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from typing import Any

import numpy as np
import pandas as pd

ENV = "GRADSCOPE_FRAME_DIGEST"
OWNER_ENV = "GRADSCOPE_FRAME_OWNER"  # who made the frame (a test id); set by tests/conftest.py

_lock = threading.Lock()
_made: dict[str, int] = {}  # frames made so far in this process, by owner


def column_digest(values: pd.Series) -> str:
    """The digest of one column's values: floats as their exact float64 bytes (every NaN
    the same NaN, -0.0 apart from 0.0), anything else through pandas' stable hashes."""
    if pd.api.types.is_float_dtype(values.dtype):
        data = values.to_numpy(dtype=np.float64, na_value=np.nan).copy()
        data[np.isnan(data)] = np.nan  # NaN payloads and signs differ between kernels
        raw = data.tobytes()
    else:
        raw = pd.util.hash_pandas_object(values, index=False).to_numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()[:16]


def frame_digest(frame: pd.DataFrame) -> dict[str, Any]:
    """Rows, each column's name, dtype and digest, and one digest over all of them."""
    columns = [[str(c), str(frame[c].dtype), column_digest(frame[c])] for c in frame.columns]
    whole = hashlib.sha256(json.dumps([len(frame), columns]).encode()).hexdigest()[:16]
    return {"rows": len(frame), "columns": columns, "digest": whole}


def log_frame(frame: pd.DataFrame) -> None:
    """Appends the frame's digest to $GRADSCOPE_FRAME_DIGEST with its owner (nothing when
    the variable is not set)."""
    path = os.environ.get(ENV)
    if not path:
        return
    owner = os.environ.get(OWNER_ENV) or os.environ.get("PYTEST_CURRENT_TEST") or "?"
    with _lock:
        seq = _made.get(owner, 0)
        _made[owner] = seq + 1
    line = {"owner": owner, "pid": os.getpid(), "seq": seq, **frame_digest(frame)}
    with open(path, "a", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # several processes append to one file
        f.write(json.dumps(line) + "\n")
