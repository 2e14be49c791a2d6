"""`python -m benchmarks.faults`: runs the fault benchmark (see run.py)."""

from benchmarks.faults.run import main

main()
