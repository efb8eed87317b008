"""ffv-eval's lazy hook into lm-eval, imported at interpreter start-up by _ffv_eval_autoload.pth.

lm-eval 0.4.13 has no plugin discovery. This installs a tiny `sys.meta_path` finder that does
nothing until lm-eval imports one of the modules in `_TRIGGERS`; right after that module has
executed, it calls the matching function of `ffv_eval.harness.plugin`, which registers the
`ffv-patched` model type or adds the project's task folder to every TaskManager. A program that
never imports lm-eval pays for importing this module and a dict look-up per new import: nothing
else (no ffv_eval, lm_eval, torch ...) is imported. Once both triggers have fired the finder
removes itself.

This covers `lm_eval ...`, `python -m lm_eval ...`, `lm_eval.simple_evaluate(...)` and any
direct use of `lm_eval.api.registry.get_model` or `lm_eval.tasks.TaskManager`. A failure inside
ffv_eval is reported on stderr and never breaks lm-eval: when ffv_eval itself cannot be imported
(a broken or stale install, a missing dependency, a dependency version outside the supported
range) one warning says why and the remaining step is skipped; a failure of one step warns for
that step.

Shipped as a copy in site-packages (both for wheel and editable installs, see hatch_build.py):
after editing this file, reinstall the project. FFV_EVAL_NO_AUTOLOAD=1 switches the hook off.
"""

import sys

# module whose execution triggers a step of ffv_eval.harness.plugin -> what that step does
_TRIGGERS = {
    "lm_eval.api.registry": "register the ffv-patched model",  # register_model()
    "lm_eval.tasks.manager": "add its task folder",  # include_project_tasks(TaskManager)
}


_import_failed = False  # ffv_eval could not be imported: warned once, nothing more to try


def _one_line(err):
    return " ".join(f"{type(err).__name__}: {err}".split())


def _warn(what, err):
    sys.stderr.write(
        f"WARNING: ffv-eval could not {what} in lm-eval ({_one_line(err)}); "
        "lm-eval works without it. Set FFV_EVAL_NO_AUTOLOAD=1 to silence this.\n"
    )


def _run(trigger, module):
    global _import_failed
    if _import_failed:
        return
    try:
        from ffv_eval.harness import plugin
    except Exception as err:  # a broken install: one warning for both steps
        _import_failed = True
        sys.stderr.write(
            f"WARNING: ffv-eval is installed but cannot be imported ({_one_line(err)}); lm-eval's own "
            "models and tasks work, the ffv-patched model and the ffv-eval tasks are missing. Reinstall "
            "ffv-eval to fix it, or set FFV_EVAL_NO_AUTOLOAD=1 to silence this.\n"
        )
        return
    try:
        if trigger == "lm_eval.tasks.manager":
            plugin.include_project_tasks(module.TaskManager)
        else:
            plugin.register_model()
    except Exception as err:  # never break lm-eval because of us
        _warn(_TRIGGERS[trigger], err)


class _Finder:
    """Finds nothing itself: for a pending trigger module it asks the finders after it for the
    real spec and makes that spec's loader call `_run` once the module has executed."""

    def __init__(self):
        self.pending = set(_TRIGGERS)

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.pending:
            return None
        spec = None
        meta_path = list(sys.meta_path)
        start = meta_path.index(self) + 1 if self in meta_path else 0
        for finder in meta_path[start:]:
            find = getattr(finder, "find_spec", None)
            if find is not None and not isinstance(finder, _Finder):
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        loader = getattr(spec, "loader", None)
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return spec  # let the import system deal with it as usual

        def exec_then_register(module):
            exec_module(module)
            # Only now (a find_spec call may be a mere probe, and exec_module may fail).
            if fullname in self.pending:
                self.pending.discard(fullname)
                if not self.pending:
                    self.uninstall()
                _run(fullname, module)

        # Patch this module's own loader instance (not a wrapper), so spec.loader and
        # module.__loader__ keep their type and all other methods (get_source, resources...).
        try:
            loader.exec_module = exec_then_register
        except Exception as err:
            _warn("hook into " + fullname, err)
        return spec

    def uninstall(self):
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass


def install():
    """Install the finder (once per interpreter). Called by _ffv_eval_autoload.pth."""
    import os

    if os.environ.get("FFV_EVAL_NO_AUTOLOAD", "") not in ("", "0"):
        return
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    finder = _Finder()
    # Trigger modules already imported (install() called late, by hand): run their step now.
    for trigger in list(finder.pending):
        module = sys.modules.get(trigger)
        if module is not None:
            finder.pending.discard(trigger)
            _run(trigger, module)
    if finder.pending:
        sys.meta_path.insert(0, finder)
