"""What every command shares: the typer app, shared options, one-line errors, the download.

Exit codes mean one thing each: 0 fine, 1 "B is worse" (gradscope diff) only, 2 any bad
input or environment error (a damaged file, a full disk, no permission), told in one line
that names the file; 130 interrupted. Every command runs inside one error wrapper
(`guarded`), so no error reaches the user as a traceback.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TextIO

import click
import typer

if TYPE_CHECKING:
    pass


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    text = str(message).removeprefix("gradscope: ")
    print(f"warning: {text}", file=sys.stderr)  # noqa: T201  (the CLI's own output)


def guarded(command: Callable[..., Any]) -> Callable[..., Any]:
    """Runs a command with every error told in one line and its exit code (see above);
    warnings are one line each too. GRADSCOPE_DEBUG=1 shows unexpected errors' tracebacks."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        from gradscope.files import describe

        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            try:
                return command(*args, **kwargs)
            except (typer.Exit, click.exceptions.Exit, click.ClickException, click.Abort):
                raise
            except KeyboardInterrupt:
                fail("interrupted", 130)
            except OSError as e:
                fail(describe(e))
            except (ValueError, RuntimeError) as e:  # the library's errors (RunError, ...)
                if os.environ.get("GRADSCOPE_DEBUG"):
                    raise
                fail(str(e) or type(e).__name__)
            except Exception as e:
                if os.environ.get("GRADSCOPE_DEBUG"):
                    raise
                fail(f"unexpected {type(e).__name__}: {e} (GRADSCOPE_DEBUG=1 shows where)")

    return run


class _GuardedTyper(typer.Typer):
    """A Typer app whose commands run inside `guarded`."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        register = super().command(*args, **kwargs)

        def decorator(f: Any) -> Any:
            register(guarded(f))
            return f

        return decorator


app = _GuardedTyper(
    help="gradscope: see where gradients vanish or explode, and why.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain one-line usage errors
)

DataRoot = Annotated[
    str | None,
    typer.Option(
        "--data-root",
        envvar="GRADSCOPE_DATA",
        help="Folder holding MNIST/raw/ (and FashionMNIST/raw/); default: $GRADSCOPE_DATA, "
        "else ~/.cache/gradscope.",
    ),
]


def fail(message: str, code: int = 2) -> NoReturn:
    """Prints a one-line error and exits."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def fetch_data(dataset: str, data_root: str | None) -> None:
    """Downloads what is missing of an IDX dataset, with a progress bar; found files are only
    checked. Exits 2 with the loader's one-line error where that cannot be done."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from gradscope.lab.data import DataError, ensure_files

    if dataset not in ("mnist", "fashion-mnist"):
        return  # synthetic, or unknown: the loader says so
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), transient=True
    ) as bar:
        tasks: dict[str, Any] = {}

        def show(name: str, done: int, total: int | None) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(f"downloading {name}", total=total)
            bar.update(tasks[name], completed=done)

        try:
            ensure_files(dataset, data_root, show)
        except DataError as e:
            fail(str(e))


def int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        fail(f"{what} must be comma-separated integers, got {text!r}")
    if not values:
        fail(f"{what} is empty")
    return values
