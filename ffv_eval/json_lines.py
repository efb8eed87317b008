"""Reading JSON and JSON-lines files with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def json_line_objects(path: Path, error: type[Exception] = ValueError) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line of a JSON-lines file; `error` is raised,
    naming the file and line, for a malformed line or one that is not a JSON object."""
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{path}: line {lineno}: malformed JSON ({err.msg})") from err
        if not isinstance(obj, dict):
            raise error(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def json_document(path: Path, error: type[Exception] = ValueError):
    """The JSON value of a whole file; `error`, naming the file and line, if it is malformed."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise error(f"{path}: line {err.lineno}: malformed JSON ({err.msg})") from err
