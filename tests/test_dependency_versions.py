"""Dependency versions (ffv_eval.dependency_versions): a package outside the supported range or
missing names the package, its version, the range and the fix. (The import error it becomes in
an installed wheel: tests/e2e/test_packaging.py.)"""

from ffv_eval.dependency_versions import version_problems


def test_version_problems_name_package_version_range_and_fix():
    requirements = ["torch>=2.4,<3", "lm-eval>=0.4.9,<0.5", "nnsight>=0.5,<0.9", "transformers>=5.0,<6",
                    "accelerate>=1.2,<2", "pytest>=7; extra == 'test'", "torch<1; extra == 'old'"]
    installed = {"torch": "2.13.0+cpu", "lm-eval": "0.4.13", "nnsight": "0.9.0rc1", "transformers": None, "accelerate": "0.1"}
    problems = version_problems(requirements, installed.get)
    assert problems == [
        "nnsight 0.9.0rc1 is installed, outside the supported range <0.9,>=0.5; fix: pip install 'nnsight<0.9,>=0.5'",
        "transformers is not installed; ffv-eval supports transformers<6,>=5.0; fix: pip install 'transformers<6,>=5.0'",
    ]
    assert version_problems(requirements, {**installed, "nnsight": "0.8.1", "transformers": "5.3.0.dev0"}.get) == []
