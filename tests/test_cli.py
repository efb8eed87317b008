"""The `ffv` command line (ffv_eval.cli): every subcommand that loads a model checks the placement
first. (Errors and exit statuses: tests/test_errors.py.)"""

import pytest
import torch

MODEL_SUBCOMMANDS = [
    ["extract", "--relation", "antonym"], ["train", "--relation", "antonym"], ["decode", "antonym"], ["build-library"],
    ["compare"], ["check"], ["basis", "build"], ["compose", "--pair", "hot:cold"], ["align"],
    ["explain-cfv", "leaderboards/results/analogies", "--task", "u2_analogy"],
]


@pytest.mark.parametrize("args", MODEL_SUBCOMMANDS, ids=lambda a: " ".join(a[:2]))
def test_every_model_subcommand_refuses_a_missing_device_before_any_model_work(args, monkeypatch, capsys, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from ffv_eval.cli import main
    from ffv_eval.models import loading as model_loading

    def refuse(*a, **k):
        raise AssertionError("model work started before the placement was checked")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(model_loading, "resolve_pretrained", refuse)
    monkeypatch.setattr(HFLM, "__init__", refuse)
    monkeypatch.chdir(tmp_path)
    for extra, message in ((["--device", "cuda:3"], "--device cuda:3: no CUDA GPU is available"),
                           (["--dtype", "half-ish"], "--dtype 'half-ish': unknown dtype"),
                           (["--device", "cpu", "--device-map", "auto"], "exclude each other")):
        assert main([*args, *extra]) == 2
        assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_basis_build_takes_no_relation_margins_and_refuses_a_bad_one_before_any_model_work(monkeypatch, capsys):
    from ffv_eval.cli import main
    from ffv_eval.vectors import composite_jobs

    seen = []
    monkeypatch.setattr(composite_jobs, "build_basis_and_map", lambda *a, **k: seen.append(a[6]))
    assert main(["basis", "build", "--no-relation", "none", "1.5", "--scales", "0.5"]) in (0, None)
    assert seen[0].no_relation == (None, 1.5) and seen[0].scales == (0.5,)
    with pytest.raises(SystemExit) as exit_:
        main(["basis", "build", "--no-relation", "high"])
    assert exit_.value.code == 2 and "'high': expected a number of nats or none" in capsys.readouterr().err
    assert len(seen) == 1
