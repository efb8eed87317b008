"""Reading JSON and JSON-lines files with errors that name the file and line: the caller's own
error class (an ffv_eval.errors.FFVError), also for a file that is missing or unreadable."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path


def _text(path: Path, error: type[Exception]) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{path}: not a UTF-8 text file ({err.reason})") from err
    except OSError as err:
        raise error(f"{path}: cannot read the file ({err.strerror or err})") from err


def json_line_objects(path: Path, error: type[Exception]) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line of a JSON-lines file; `error` is raised,
    naming the file and line, for a malformed line or one that is not a JSON object."""
    for lineno, line in enumerate(_text(path, error).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{path}: line {lineno}: malformed JSON ({err.msg})") from err
        if not isinstance(obj, dict):
            raise error(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def json_document(path: Path, error: type[Exception]):
    """The JSON value of a whole file; `error`, naming the file and line, if it is malformed."""
    text = _text(path, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{path}: line {err.lineno}: malformed JSON ({err.msg})") from err


def json_object(path: Path, error: type[Exception], required: Sequence[str] = (), what: str = "") -> dict:
    """A file holding one JSON object with the `required` fields; `error` names the file, and
    `what` the kind of document expected ("not <what>: ..."), if it is not."""
    document = json_document(path, error)
    prefix = f"not {what}" if what else ""
    if not isinstance(document, dict):
        raise error(f"{path}: {prefix + ' (' if prefix else ''}expected a JSON object{')' if prefix else ''}")
    for name in required:
        if name not in document:
            raise error(f"{path}: {prefix + ': ' if prefix else ''}field '{name}' is missing")
    return document
