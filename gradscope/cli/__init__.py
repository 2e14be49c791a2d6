"""The gradscope command line: train, depth-sweep, report, diff, reproduce. The only typer
package: each command parses, calls the library and prints.

- common.py     the app, shared options, one-line errors, the data download with a bar
- train.py, sweep.py (depth-sweep, report), runs.py (diff), reproduce.py
"""

from gradscope.cli import reproduce, runs, sweep, train  # noqa: F401  (registers commands)
from gradscope.cli.common import app

__all__ = ["app"]

if __name__ == "__main__":  # pragma: no cover
    app(prog_name="gradscope")
