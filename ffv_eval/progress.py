"""Progress messages of the jobs (`[ffv] ...` lines), the one home of how they are shown: printed
and flushed at once, so that they appear live in logs and in order with lm-eval's output.
Jobs take a `progress` callable that defaults to `show_progress`; the library functions they call
pass messages on to theirs, which defaults to `no_progress`."""

from __future__ import annotations


def show_progress(message: str) -> None:
    """Print a progress message now (flushed)."""
    print(message, flush=True)


def no_progress(message: str) -> None:
    """Drop a progress message (the default of library functions called outside a job)."""
