"""Make `ffv-patched` and the project's tasks visible to a stock lm-eval 0.4.13, which has
no plugin discovery.

The import hook in the top-level module `_ffv_eval_autoload` (loaded at interpreter start-up
by `_ffv_eval_autoload.pth`) calls, with no work in programs that never import lm-eval:

* `register_model()` right after `lm_eval.api.registry` has executed, and
* `include_project_tasks(TaskManager)` right after `lm_eval.tasks.manager` has executed.

Both run in the middle of lm-eval's own imports, so they must not import any lm-eval module
that may be half-initialised at that point (e.g. `lm_eval.tasks`), nor anything heavy.
`register()` does both at once, for callers outside the hook (lm-eval fully importable).
"""

from __future__ import annotations

import os
from pathlib import Path

MODEL_NAME = "ffv-patched"
# A lazy placeholder, as lm-eval's own models use: `ffv_eval.harness.model` (torch, nnsight, ...)
# is imported only when `get_model("ffv-patched")` is called. Its
# `@register_model("ffv-patched")` then replaces the placeholder with the class; lm-eval allows
# that only when this string is exactly "<module>:<class name>" of the decorated class, so it
# must match the class (and the `lm_eval.models` entry point in pyproject.toml).
MODEL_TARGET = "ffv_eval.harness.model:FFVPatchedLM"


def register_model() -> None:
    """Register `ffv-patched` in lm-eval's model registry (idempotent, cheap)."""
    # get_model() fills the registry with lm-eval's built-in models only when the registry is
    # empty, so those must be registered before ours. Safe while lm-eval is mid-import: this
    # package only needs lm_eval.api.registry, which has fully executed when we are called.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:  # ffv_eval.harness.model may already have registered it
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


def _same_path(a: str | os.PathLike, b: Path) -> bool:
    try:
        return os.path.realpath(a) == os.path.realpath(b)
    except (TypeError, ValueError):
        return False


def _with_project_tasks(include_path):
    """`include_path` (None, str, PathLike or a list/tuple of them) plus the project's task
    folder, as a list. Our folder goes first, so folders the caller names explicitly still win
    (lm-eval lets later paths override earlier ones); it is not added twice."""
    import ffv_eval  # read at call time, so a caller may repoint ffv_eval.TASKS_DIR

    tasks_dir = Path(ffv_eval.TASKS_DIR)
    if include_path is None:
        paths = []
    elif isinstance(include_path, (str, bytes, os.PathLike)):
        paths = [include_path]
    else:
        paths = list(include_path)
    if not tasks_dir.is_dir() or any(_same_path(p, tasks_dir) for p in paths):
        return include_path
    return [str(tasks_dir), *paths]


def include_project_tasks(manager_cls=None) -> None:
    """Make every `TaskManager(...)` also scan the project's task folder (idempotent).

    `manager_cls` is `lm_eval.tasks.manager.TaskManager`; the hook passes it because it runs
    while `lm_eval.tasks` is still being imported."""
    if manager_cls is None:
        from lm_eval.tasks.manager import TaskManager as manager_cls
    if getattr(manager_cls.__init__, "_ffv_eval_wrapped", False):
        return

    import functools
    import inspect

    original_init = manager_cls.__init__
    params = list(inspect.signature(original_init).parameters)  # (self, verbosity, include_path, ...)
    if "include_path" not in params:
        raise TypeError(f"{manager_cls.__qualname__}.__init__ has no include_path parameter: {params}")
    position = params.index("include_path")  # index in (self, *args)

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        if len(args) >= position:  # passed positionally
            args = (*args[: position - 1], _with_project_tasks(args[position - 1]), *args[position:])
        else:
            kwargs["include_path"] = _with_project_tasks(kwargs.get("include_path"))
        original_init(self, *args, **kwargs)

    __init__._ffv_eval_wrapped = True
    manager_cls.__init__ = __init__


def register() -> None:
    """Register the model type and the task folder; for use when lm-eval is fully importable
    (the import hook calls the two steps separately)."""
    register_model()
    include_project_tasks()
