"""VectorSpec: the one parser of ffv-patched's vector= (every form, and the errors of bad input)
and the one per-task policy (vector=auto, <kind>:*). No model, no torch."""

from __future__ import annotations

import os

import pytest

from ffv_eval.vectors.library import BARE_NAME_KINDS, KINDS
from ffv_eval.vectors.spec import AUTO, COMPOSITE, EACH_RELATION, FILE, NAME, NONE, VectorNameError, VectorSpec, VectorTaskMismatch


@pytest.mark.parametrize("value, form, kind, relation, path", [
    (None, NONE, None, None, None),
    ("", NONE, None, None, None),
    ("none", NONE, None, None, None),
    ("auto", AUTO, None, None, None),
    ("cfv", COMPOSITE, None, None, None),
    ("antonym", NAME, None, "antonym", None),
    ("fv:antonym", NAME, "fv", "antonym", None),
    ("ffv-random:english-french", NAME, "ffv-random", "english-french", None),
    ("ffv:*", EACH_RELATION, "ffv", None, None),
    ("fv:*", EACH_RELATION, "fv", None, None),
    ("mine.safetensors", FILE, None, None, "mine.safetensors"),
    (f"some{os.sep}dir{os.sep}antonym", FILE, None, None, f"some{os.sep}dir{os.sep}antonym"),
])
def test_every_form_parses_and_prints_back(value, form, kind, relation, path):
    spec = VectorSpec.parse(value)
    assert (spec.form, spec.kind, spec.relation, spec.path) == (form, kind, relation, path)
    assert VectorSpec.parse(str(spec)) == spec  # str() is the vector= that gives it back
    assert VectorSpec.parse(spec) is spec
    if value:
        assert str(spec) == str(value)


def test_an_existing_file_is_a_file_whatever_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "antonym").write_text("")
    assert VectorSpec.parse("antonym") == VectorSpec(FILE, path="antonym")
    assert VectorSpec.parse(tmp_path / "x.safetensors") == VectorSpec(FILE, path=str(tmp_path / "x.safetensors"))


def test_what_each_form_is():
    forms = {text: VectorSpec.parse(text) for text in ("none", "auto", "cfv", "antonym", "fv:antonym", "ffv:*", "v.safetensors")}
    assert [t for t, s in forms.items() if s.per_task] == ["auto", "ffv:*"]
    assert [t for t, s in forms.items() if s.names_vectors] == ["antonym", "fv:antonym", "v.safetensors"]
    assert [t for t, s in forms.items() if s.is_none] == ["none"]
    assert [t for t, s in forms.items() if s.is_composite] == ["cfv"]
    assert {t: s.per_task_kind for t, s in forms.items() if s.per_task_kind} == {"auto": "auto", "ffv:*": "ffv"}
    assert forms["antonym"].kinds == BARE_NAME_KINDS and forms["fv:antonym"].kinds == ("fv",)


@pytest.mark.parametrize("value, message", [
    ("cfx:antonym", f"vector=cfx:antonym: unknown kind 'cfx' \\(known: {', '.join(KINDS)}\\)"),
    ("nope:*", "vector=nope:\\*: unknown kind 'nope'"),
    (":*", "vector=:\\*: unknown kind ''"),
    ("fv:ffv:antonym", "unknown kind 'fv:ffv'"),
    ("ffv:", "vector=ffv:: '' is not a relation name \\(e.g. antonym, ffv:antonym"),
    ("*", "vector=\\*: '\\*' is not a relation name"),
    ("fv:ant*", "'ant\\*' is not a relation name"),
])
def test_bad_specs_are_named_errors(value, message):
    with pytest.raises(VectorNameError, match=message):
        VectorSpec.parse(value)


# -- the per-task policy -----------------------------------------------------------------------
def test_auto_gives_relation_tasks_their_ffv_and_analogy_tasks_a_cfv():
    auto = VectorSpec.parse("auto")
    assert auto.for_task("relation_antonym", docs_have_source_pair=False) == VectorSpec.parse("ffv:antonym")
    assert auto.for_task("relation_antonym", docs_have_source_pair=True) == VectorSpec.parse("ffv:antonym")
    assert auto.for_task("u2_analogy", docs_have_source_pair=True) == VectorSpec.parse("cfv")
    with pytest.raises(VectorTaskMismatch, match=r"vector=auto: task hellaswag has no vector of its own: it is not a "
                                                 r"relation_<name> task .* kinds fv, ffv, ffv-first-token, ffv-random\); "
                                                 r"vector=none runs it unpatched"):
        auto.for_task("hellaswag", docs_have_source_pair=False)


def test_kind_star_gives_each_relation_task_its_own_vector_and_refuses_others():
    each = VectorSpec.parse("fv:*")
    assert each.for_task("relation_english-french", docs_have_source_pair=False) == VectorSpec(NAME, "fv", "english-french")
    for pairs in (True, False):
        with pytest.raises(VectorTaskMismatch, match=r"vector=fv:\* patches each relation_<name> task with that relation's "
                                                     r"fv; task u2_analogy is not one"):
            each.for_task("u2_analogy", docs_have_source_pair=pairs)


@pytest.mark.parametrize("text", ["none", "cfv", "antonym", "fv:antonym", "v.safetensors"])
def test_other_specs_are_the_same_for_every_task(text):
    spec = VectorSpec.parse(text)
    for task in ("relation_antonym", "u2_analogy", "hellaswag"):
        assert spec.for_task(task, docs_have_source_pair=False) is spec


def test_the_spec_module_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, ffv_eval.vectors.spec, ffv_eval.vectors.record, ffv_eval.vectors.library; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
