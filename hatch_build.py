"""Hatchling build hook: ship ffv-eval's lazy lm-eval import hook, and the data folders.

lm-eval 0.4.13 has no plugin discovery, so the wheel carries, at the top of site-packages,
`_ffv_eval_autoload.pth` (run by `site` at interpreter start-up) and the tiny module it imports,
`_ffv_eval_autoload.py`, which registers ffv-eval with lm-eval once lm-eval is imported. Both go
into regular *and* editable wheels (hatchling's editable wheel otherwise holds only a path
.pth). A regular wheel also carries `tasks/` and `vectors/` (when present) as
`ffv_eval/_bundled/...`, which `ffv_eval.TASKS_DIR` / `VECTORS_DIR` then point to; an
editable install uses the checkout's folders directly.
"""

from __future__ import annotations

import os

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

AUTOLOAD_FILES = ("_ffv_eval_autoload.pth", "_ffv_eval_autoload.py")
DATA_FOLDERS = ("tasks", "vectors")


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel":
            return
        files = {os.path.join(self.root, name): name for name in AUTOLOAD_FILES}
        if version == "editable":
            # A non-empty force_include_editable replaces [tool.hatch...force-include] there.
            build_data["force_include_editable"].update(files)
            return
        build_data["force_include"].update(files)
        for folder in DATA_FOLDERS:
            source = os.path.join(self.root, folder)
            if os.path.isdir(source):  # force-include fails on a missing folder
                build_data["force_include"][source] = f"ffv_eval/_bundled/{folder}"
