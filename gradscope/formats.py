"""The JSON files gradscope writes (a run folder's run.json, a sweep run's row), read through
one schema each: required and optional fields with their types, and a format version.

Unknown fields (what a newer version writes) are ignored with a warning naming them; a
missing or mistyped field is a FormatError naming the file and the field.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# the kinds a field may hold: JSON's own, and "number" (an int or float, or the text of a
# non-finite one, as run.json writes them)
_KINDS: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "bool": (bool,),
    "dict": (dict,),
    "list": (list,),
    "number": (int, float, str),
    "null": (type(None),),
}


class FormatError(ValueError):
    """A JSON file that is not what gradscope writes; the message names the file and field."""


@dataclass(frozen=True)
class Field:
    name: str
    kinds: tuple[str, ...]
    required: bool = True

    def accepts(self, value: Any) -> bool:
        for kind in self.kinds:
            if kind != "bool" and isinstance(value, bool):
                continue  # JSON's true is not a count
            if not isinstance(value, _KINDS[kind]):
                continue
            if kind == "number" and isinstance(value, str):
                try:
                    if math.isfinite(float(value)):
                        continue  # only non-finite numbers are written as text
                except ValueError:
                    continue
            return True
        return False


def field(name: str, *kinds: str, required: bool = True) -> Field:
    return Field(name, kinds, required)


def read_json(path: Path) -> Any:
    """A JSON file's content; FormatError where it is not readable JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} is damaged: not JSON ({e})") from None


def check(
    data: Any, fields: list[Field], path: Path, where: str = "", unknown: list[str] | None = None
) -> dict[str, Any]:
    """`data` checked against `fields`; returns it. Unknown fields are added to `unknown`
    (prefixed with `where`), for one warning per file (see warn_unknown)."""
    if not isinstance(data, dict):
        what = f"{where} " if where else ""
        raise FormatError(f"{path}: {what}is a {type(data).__name__}, not an object")
    for f in fields:
        name = f"{where}.{f.name}" if where else f.name
        if f.name not in data:
            if f.required:
                raise FormatError(f"{path}: field '{name}' is missing")
            continue
        if not f.accepts(data[f.name]):
            raise FormatError(
                f"{path}: field '{name}' is {json.dumps(data[f.name])[:60]}, "
                f"expected {' or '.join(f.kinds)}"
            )
    if unknown is not None:
        known = {f.name for f in fields}
        unknown += [f"{where}.{k}" if where else k for k in data if k not in known]
    return data


def warn_unknown(path: Path, unknown: list[str]) -> None:
    if unknown:
        warnings.warn(
            f"{path}: ignoring fields this gradscope version does not know: "
            + ", ".join(unknown[:8])
            + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""),
            UserWarning,
            stacklevel=3,
        )


def check_version(data: dict[str, Any], path: Path, newest: int) -> int:
    """The file's format version (1 where it has none: written before versions were)."""
    version = data.get("format", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FormatError(f"{path}: field 'format' is {json.dumps(version)[:40]}, expected int")
    if version > newest:
        warnings.warn(
            f"{path} was written by a newer gradscope (format {version}; this one reads "
            f"{newest}): reading the fields it knows",
            UserWarning,
            stacklevel=3,
        )
    return version


# -- run.json ------------------------------------------------------------------------------

RUN_FORMAT = 2  # 2: "frame" (rows, sha256) added

RUN_FIELDS = [
    field("format", "int"),
    field("name", "str"),
    field("model", "dict"),
    field("recorder", "dict"),
    field("steps", "dict"),
    field("versions", "dict"),
    field("verdicts", "list"),
    field("frame", "dict", required=False),  # required from format 2 (checked by the reader)
    field("spill", "dict", required=False),
]
FRAME_FIELDS = [field("rows", "int"), field("sha256", "str")]
VERDICT_FIELDS = [
    field("id", "str"),
    field("severity", "str"),
    field("message", "str"),
    field("suggestion", "str"),
    field("layers", "list", required=False),
    field("evidence", "dict", required=False),
    field("threshold", "number", "null", required=False),
    field("first_step", "int", "null", required=False),
    field("last_step", "int", "null", required=False),
    field("explains", "list", required=False),
]


def check_run_info(data: Any, path: Path, severities: list[str]) -> dict[str, Any]:
    """run.json checked; the verdicts keep only the fields a Verdict has."""
    unknown: list[str] = []
    check(data, RUN_FIELDS, path, unknown=unknown)
    version = check_version(data, path, RUN_FORMAT)
    if version >= 2:
        if "frame" not in data:
            raise FormatError(f"{path}: field 'frame' is missing")
        check(data["frame"], FRAME_FIELDS, path, "frame", unknown)
    verdicts = []
    for i, v in enumerate(data["verdicts"]):
        check(v, VERDICT_FIELDS, path, f"verdicts[{i}]", unknown)
        if v["severity"] not in severities:
            raise FormatError(
                f"{path}: field 'verdicts[{i}].severity' is {v['severity']!r}, expected one "
                f"of {', '.join(severities)}"
            )
        verdicts.append({f.name: v[f.name] for f in VERDICT_FIELDS if f.name in v})
    warn_unknown(path, unknown)
    return {**data, "verdicts": verdicts}


# -- a sweep run's row (runs/<id>.json) ----------------------------------------------------

SWEEP_ROW_FORMAT = 2  # 2: "format" written (rows without one are format 1, read alike)

# in the order of runs.csv's columns (lab.sweep.RUN_COLUMNS is this list's names)
SWEEP_ROW_FIELDS = [
    field("format", "int", required=False),
    field("variant", "str"),
    field("depth", "int"),
    field("seed", "int"),
    field("width", "int"),
    field("activation", "str"),
    field("init", "str"),
    field("optimizer", "str"),
    field("lr", "number", "null"),
    field("steps", "int"),
    field("batch_size", "int"),
    *(
        field(name, "number", "null")
        for name in (
            "train_acc",
            "test_acc",
            "train_loss",
            "test_loss",
            "final_loss",
            "grad_ratio_init",
            "grad_ratio_end",
            "grad_decay_init",
            "grad_decay_end",
            "grad_decay_theory",
        )
    ),
    field("diverged", "bool"),
    field("seconds", "number", "null"),
    field("verdicts_init", "str"),
    field("verdicts", "str"),
    field("details", "dict"),
]
DETAILS_FIELDS = [field("init", "list"), field("end", "list")]


def check_sweep_row(data: Any, path: Path) -> dict[str, Any]:
    """A sweep run's row checked (see SWEEP_ROW_FIELDS)."""
    unknown: list[str] = []
    check(data, SWEEP_ROW_FIELDS, path, unknown=unknown)
    check_version(data, path, SWEEP_ROW_FORMAT)
    check(data["details"], DETAILS_FIELDS, path, "details", unknown)
    for phase in ("init", "end"):
        for i, v in enumerate(data["details"][phase]):
            check(v, VERDICT_FIELDS, path, f"details.{phase}[{i}]", unknown)
    warn_unknown(path, unknown)
    return data
