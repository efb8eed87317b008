"""The versions of the packages ffv-eval's code is bound to, checked when `ffv_eval` is imported.

The supported ranges have one home: the requirements in pyproject.toml, which pip writes into
the installed ffv-eval's metadata; this module reads them from there. Only the packages whose
APIs the code calls deeply are checked (torch, lm-eval, nnsight, transformers); a version
outside its range is an ImportError that names the package, the installed version, the range
and the pip command that fixes it. Cheap: it reads metadata files and never imports the
packages it checks (so importing ffv_eval does not import torch)."""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable, Iterable

from ffv_eval.errors import FFVError

DISTRIBUTION = "ffv-eval"
CHECKED = ("torch", "lm-eval", "nnsight", "transformers")
SKIP_ENV = "FFV_EVAL_SKIP_VERSION_CHECK"


class DependencyVersionError(FFVError, ImportError):
    """An installed dependency is missing or outside the range this ffv-eval supports."""


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_problems(requirements: Iterable[str], version_of: Callable[[str], str | None] = installed_version) -> list[str]:
    """One sentence per checked package of `requirements` (requirement strings, as in the
    metadata) that `version_of` finds missing or out of range."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version

    checked = {canonicalize_name(name) for name in CHECKED}
    problems = []
    for text in requirements:
        requirement = Requirement(text)
        if canonicalize_name(requirement.name) not in checked:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # an extra's requirement, or one for another platform
        wanted = f"{requirement.name}{requirement.specifier}"
        fix = f"pip install '{wanted}'"
        found = version_of(requirement.name)
        if found is None:
            problems.append(f"{requirement.name} is not installed; ffv-eval supports {wanted}; fix: {fix}")
            continue
        try:
            inside = requirement.specifier.contains(Version(found), prereleases=True)
        except InvalidVersion:
            inside = False
        if not inside:
            problems.append(f"{requirement.name} {found} is installed, outside the supported range "
                            f"{requirement.specifier}; fix: {fix}")
    return problems


def check_installed_versions(package_version: str) -> None:
    """Raise DependencyVersionError (one line) if a checked dependency is missing or out of range.
    Nothing is checked when ffv-eval itself is not installed (a bare source tree has no
    metadata) or when $FFV_EVAL_SKIP_VERSION_CHECK is set."""
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return
    try:
        requirements = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return
    problems = version_problems(requirements)
    if problems:
        raise DependencyVersionError(
            f"ffv-eval {package_version} cannot run with the installed packages: {'; '.join(problems)} "
            f"(or set {SKIP_ENV}=1 to try anyway)"
        )
