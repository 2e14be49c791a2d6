"""What every command shares: the typer app, shared options, one-line errors, the download."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    pass

app = typer.Typer(
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
