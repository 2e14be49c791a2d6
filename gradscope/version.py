"""The installed distribution's version, read once from the package metadata."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "gradscope-toolkit"


def installed_version() -> str:
    """The version pip installed (pyproject.toml's), or "unknown" for a bare source tree."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


__version__ = installed_version()
