"""Every frame the test suite records, before and after a change: records their digests
(gradscope/digest.py) over a test run, and compares two such records.

    python tools/frames_compare.py record /tmp/frames-before.jsonl    # on the tree before
    python tools/frames_compare.py record /tmp/frames-after.jsonl     # on the tree after
    python tools/frames_compare.py compare /tmp/frames-before.jsonl /tmp/frames-after.jsonl --base 3e04db4

`record` runs the default test selection (`make test`'s: not slow, not e2e; arguments after
the file go to pytest, e.g. `-m "not slow"` for CI's) with GRADSCOPE_FRAME_DIGEST set: each
`Recorder.to_frame()` in the tests and in their child processes (CLI runs, sweep workers)
logs its test id and the digest of the frame's column names, dtypes and exact float64 values
(NaN equal to NaN). No column is left out: a recorder's frame (step, layer, kind, stat,
value) holds no timings. Runs are seeded per test (tests/conftest.py), so unseeded tests
record the same frames twice.

`compare` matches the frames test by test, in any order (workers and child processes
interleave), and prints each test whose frames differ or that only one record has: with
`--base REV`, each is marked "test changed" when its function's source differs between REV
and the working tree (its frames are then expected to change), else "test unchanged" (a
change of behaviour, unless a helper it calls changed). Exit 0 when everything is identical.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MARKS = "not slow and not e2e"


def record(out: Path, pytest_args: list[str]) -> int:
    """Runs the tests with digests on; pytest's exit status."""
    env = {**os.environ, "GRADSCOPE_FRAME_DIGEST": str(out.resolve())}
    command = [sys.executable, "-m", "pytest", "-n", "auto", "-q", "-p", "no:cacheprovider"]
    command += ["-m", DEFAULT_MARKS, *pytest_args]
    status = subprocess.run(command, cwd=REPO, env=env).returncode
    frames = load(out)
    print(f"{sum(len(v) for v in frames.values())} frames of {len(frames)} tests in {out}")
    return status


def load(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The record's frames by test id (the owner), in the order they were logged."""
    frames: dict[str, list[dict[str, Any]]] = defaultdict(list)
    with open(path, encoding="utf-8") as f:
        for line in f:
            entry = json.loads(line)
            frames[entry["owner"].removesuffix(" (setup)").removesuffix(" (call)")].append(entry)
    return dict(frames)


def _function_source(source: str | None, owner: str) -> str | None:
    """The source (decorators included) of the test function or fixture `owner` names."""
    if source is None:
        return None
    parts = owner.split("::")[1:]
    name = parts[-1].split("[")[0].removeprefix("fixture ")
    classes = parts[:-1]
    body = ast.parse(source).body
    for cls in classes:  # test classes
        found = [n for n in body if isinstance(n, ast.ClassDef) and n.name == cls]
        if not found:
            return None
        body = found[0].body
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            lines = source.splitlines()
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            return "\n".join(lines[first - 1 : node.end_lineno])
    return None


def test_changed(owner: str, base: str) -> bool:
    """Whether the test (or shared fixture) `owner` names reads differently at `base`."""
    path = owner.split("::")[0]
    if not path.endswith(".py"):  # a conftest fixture: tests::fixture name
        path = f"{path}/conftest.py"
    shown = subprocess.run(["git", "show", f"{base}:{path}"], cwd=REPO, capture_output=True)
    before = shown.stdout.decode() if shown.returncode == 0 else None
    now_file = REPO / path
    now = now_file.read_text() if now_file.exists() else None
    old, new = _function_source(before, owner), _function_source(now, owner)
    return old is None or new is None or old != new


def _unmatched(frames: list[dict[str, Any]], left: Counter[str]) -> list[dict[str, Any]]:
    """The frames whose digests the other record lacks, as many of each as it lacks."""
    out = []
    for frame in frames:
        if left[frame["digest"]] > 0:
            left[frame["digest"]] -= 1
            out.append(frame)
    return out


def _column_changes(a: dict[str, Any], b: dict[str, Any]) -> str:
    if a["rows"] != b["rows"]:
        return f"{a['rows']} rows vs {b['rows']}"
    old = {c[0]: c[1:] for c in a["columns"]}
    new = {c[0]: c[1:] for c in b["columns"]}
    changed = [
        f"{name} ({'dtype ' if old[name][0] != new[name][0] else ''}"
        f"{old[name][0]}{' -> ' + new[name][0] if old[name][0] != new[name][0] else ''})"
        for name in old
        if name in new and old[name] != new[name]
    ]
    changed += [f"{name} only before" for name in old if name not in new]
    changed += [f"{name} only after" for name in new if name not in old]
    return "columns " + ", ".join(changed)


def compare(a: Path, b: Path, base: str | None) -> int:
    """Prints the differences between two records; 1 when there are any."""
    before, after = load(a), load(b)
    identical = 0
    lines: list[tuple[str, str]] = []  # (what, text)
    for owner in sorted(set(before) | set(after)):
        if owner not in after:
            what, text = "only-before", f"{len(before[owner])} frames"
        elif owner not in before:
            what, text = "only-after", f"{len(after[owner])} frames"
        else:
            old = Counter(f["digest"] for f in before[owner])
            new = Counter(f["digest"] for f in after[owner])
            if old == new:
                identical += 1
                continue
            gone, came = _unmatched(before[owner], old - new), _unmatched(after[owner], new - old)
            pairs = "; ".join(_column_changes(x, y) for x, y in zip(gone, came, strict=False))
            extra = len(gone) - len(came)
            count = f" ({abs(extra)} {'fewer' if extra > 0 else 'more'} after)" if extra else ""
            what = "differing"
            text = f"{sum((old - new).values())} of {sum(old.values())} frames{count}: {pairs}"
        mark = ""
        if base is not None:  # only where something differs: it runs git
            mark = " [test changed]" if test_changed(owner, base) else " [test unchanged]"
        lines.append((what, f"{owner}{mark}: {text}"))
    for what in ("differing", "only-before", "only-after"):
        for kind, text in lines:
            if kind == what:
                print(f"{what:11} {text}")
    counts = Counter(kind for kind, _ in lines)
    frames = sum(len(v) for v in before.values()), sum(len(v) for v in after.values())
    print(
        f"{identical} tests identical, {counts['differing']} differing, "
        f"{counts['only-before']} only before, {counts['only-after']} only after "
        f"({frames[0]} frames before, {frames[1]} after)"
    )
    return 1 if lines else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run the tests, logging every frame's digest")
    rec.add_argument("out", type=Path)
    cmp = sub.add_parser("compare", help="compare two records test by test")
    cmp.add_argument("before", type=Path)
    cmp.add_argument("after", type=Path)
    cmp.add_argument("--base", help="the commit the 'before' record was made at")
    args, rest = parser.parse_known_args(argv)
    if args.command == "record":
        return record(args.out, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    for path in (args.before, args.after):
        if not path.is_file():
            parser.error(f"{path}: no such file")
    return compare(args.before, args.after, args.base)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
