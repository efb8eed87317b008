"""The project's own errors: bad input, named by what went wrong, whose message names the file,
field or line and the fix.

Every error ffv-eval raises for input it validates (data files, vector files, options,
environment variables, models it cannot handle) is an FFVError; `ffv` prints such an error as
one line and exits 2, while any other exception is a bug and keeps its traceback. Each class
also subclasses the built-in error it stands for (ValueError, RuntimeError, ...), so callers
that catch those keep working.

Most errors live beside the input they check (RelationDataError in data/relations.py,
VectorFileError in vectors/store.py, ...); this module holds the base class and the errors
several modules raise. It imports nothing: `dependency_versions`, which `ffv_eval/__init__`
runs before anything else, imports it."""


class FFVError(Exception):
    """The project's own errors: bad input, named file/field/line and fix."""


class SettingError(FFVError, ValueError):
    """An option, environment variable or settings field has a value the job cannot use (the
    message names it and the values it takes)."""


class TokenizationError(FFVError, ValueError):
    """A model's tokenizer splits a prompt and its answer so that the answer's tokens cannot be
    found after the prompt's."""
