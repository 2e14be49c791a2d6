"""`python -m gradscope` runs the command-line interface."""

from gradscope.cli import app

app(prog_name="gradscope")
