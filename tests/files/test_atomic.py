"""Output places (ffv_eval.files.atomic): unwritable outputs are refused with the option to use."""

from pathlib import Path

import pytest

import ffv_eval
from ffv_eval.files.atomic import UnwritableOutput, check_writable


def test_unwritable_outputs_are_refused_with_the_option_to_use(tmp_path):
    inside = Path(ffv_eval.__file__).resolve().parent / "vectors" / "x.safetensors"
    with pytest.raises(UnwritableOutput, match=r"inside the installed ffv-eval package .* pass --out"):
        check_writable(inside, "--out")
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(UnwritableOutput, match=rf"{a_file / 'x.json'}: cannot write there \({a_file} is not a writable folder\); pass --baseline"):
        check_writable(a_file / "x.json", "--baseline")
    check_writable(tmp_path / "new" / "folder" / "x.safetensors", "--out")  # folders are made on write
    assert not (tmp_path / "new").exists()
