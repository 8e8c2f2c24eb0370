"""tools/quantize.py from the command line: bad values exit 2 naming the flag, before anything is written."""
from __future__ import annotations

import pytest
import torch

from backend.engine.errors import InvalidParameterError
from backend.engine.quantization.calibration import texts_from_file
from tools import quantize


@pytest.mark.parametrize("argv, named", [
    (["--quant", "int4_wo", "--group-size", "100"], "--group-size: must be a power of two >= 32, got 100"),
    (["--quant", "int4_awq", "--calib-samples", "0"], "--calib-samples: must be a whole number of at least 1, got 0"),
    (["--quant", "int4_gptq", "--calib-seq-len", "-1"], "--calib-seq-len: must be a whole number of at least 1"),
    (["--quant", "int8_sq", "--smoothquant-alpha", "1.5"], "--smoothquant-alpha: must be between 0 and 1, got 1.5"),
    (["--quant", "fp8", "--device", "tpu"], "--device: expected cpu or cuda (cuda:N), got 'tpu'"),
    (["--quant", "int4_awq", "--calib-file", "/no/such.txt"], "--calib-file: /no/such.txt: no such file"),
    (["--quant", "int8_wo", "--model", "/no/such/model"], "--model: /no/such/model: no such file or directory"),
] + ([] if torch.cuda.is_available() else [
    (["--quant", "fp8", "--device", "cuda"], "--device: cuda asked for calibration, but this machine has 0"),
]))
def test_bad_values_exit_2_naming_the_flag(argv, named, tiny_checkpoint, tmp_path, cli_error):
    model = [] if "--model" in argv else ["--model", str(tiny_checkpoint("llama"))]
    code, err = cli_error(quantize.main, model + argv + ["--output", str(tmp_path / "q"), "--quiet"])
    assert code == 2 and named in err
    assert not (tmp_path / "q").exists()


def test_an_existing_checkpoint_needs_overwrite(tiny_checkpoint, tmp_path, cli_error):
    argv = ["--model", str(tiny_checkpoint("llama")), "--quant", "int8_wo", "--output", str(tmp_path / "q"), "--quiet"]
    assert quantize.main(argv) == 0
    first = (tmp_path / "q" / "config.json").read_text()
    code, err = cli_error(quantize.main, argv)
    assert code == 2 and "--output" in err and "--overwrite" in err
    assert (tmp_path / "q" / "config.json").read_text() == first
    assert quantize.main(argv + ["--overwrite"]) == 0


def test_a_calibration_file_for_a_method_without_calibration_is_named_as_unused(tiny_checkpoint, tmp_path, capsys):
    argv = ["--model", str(tiny_checkpoint("llama")), "--quant", "int4_wo", "--output", str(tmp_path / "q"),
            "--calib-file", "/no/such.txt", "--quiet"]
    assert quantize.main(argv) == 0
    assert "--calib-file is not used: int4_wo is not calibrated" in capsys.readouterr().err


def test_calibration_text_without_paragraphs_is_refused(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n")
    with pytest.raises(InvalidParameterError, match="holds no text") as info:
        texts_from_file(blank)
    assert info.value.field == "calib_file"
    (tmp_path / "two.txt").write_text("First paragraph.\n\nSecond\nparagraph.\n")
    assert texts_from_file(tmp_path / "two.txt") == ["First paragraph.", "Second\nparagraph."]
