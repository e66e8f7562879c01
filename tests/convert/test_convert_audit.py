"""`python -m vlm_jax.convert` given the wrong thing: one error line that names the path
and says what it is / what to do, exit code 2, no traceback and no --out written."""
from __future__ import annotations

import json

import pytest

from vlm_jax.convert.__main__ import main


def test_missing_sources_are_named(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--hf", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert f"{tmp_path / 'nope'}: no such file or directory" in capsys.readouterr().err
    # --openclip used to report '<file>/config.json: file not found (a transformers ...)'
    assert main(["--openclip", str(tmp_path / "x.safetensors"), "--out", str(out)]) == 2
    assert f"{tmp_path / 'x.safetensors'}: no such file or directory" in capsys.readouterr().err
    assert main(["--to-hf", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert f"{tmp_path / 'nope'}: no such directory" in capsys.readouterr().err
    assert not out.exists()


def test_to_hf_of_a_transformers_dir_says_convert_first(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["--to-hf", str(hf), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "a transformers model dir (config.json), not a dir written by" in err
    assert "vlm_jax_convert.json" in err and "convert it first" in err
    assert not (tmp_path / "out").exists()


def test_bad_dtype_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--hf", str(tmp_path), "--out", str(tmp_path / "out"), "--dtype", "float17"])
    assert e.value.code == 2
    assert "--dtype: unknown dtype 'float17'" in capsys.readouterr().err


def _openclip_file(tmp_path, **kw):
    from tests.convert import hf_tiny
    from tests.convert.test_convert_vision import openclip_state
    from vlm_jax.convert import safetensors_io as st
    hf_tiny.clip_vision(tmp_path / "hf", **kw)
    path = str(tmp_path / "open_clip_model.safetensors")
    st.write(path, openclip_state(tmp_path / "hf"))
    return path


def test_openclip_heads_not_derivable_is_an_error_not_a_crash(tmp_path, capsys):
    # width 48 with OpenCLIP's default head_width 64 (no open_clip_config.json): was a
    # ZeroDivisionError traceback in param_shapes (0 heads)
    path = _openclip_file(tmp_path, hidden_size=48, num_attention_heads=4)
    assert main(["--openclip", path, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "width 48 is not a multiple of head_width 64" in err
    assert "open_clip_config.json" in err and not (tmp_path / "out").exists()


def test_openclip_default_head_width_is_announced(tmp_path, caplog):
    # width 64 and 4 heads saved without open_clip_config.json: the head count is not in
    # the weights, so the default (64 -> 1 head) is taken and said, not silently used
    path = _openclip_file(tmp_path, num_attention_heads=4)
    with caplog.at_level("WARNING", logger="vlm_jax.convert"):
        assert main(["--openclip", path, "--out", str(tmp_path / "out")]) == 0
    assert "assuming OpenCLIP's default 64 (heads = 1)" in caplog.text


def test_convert_prints_no_orbax_merge_warning(tmp_path, caplog):
    # every `--hf ... --out` printed orbax's "Skipping merge of OCDBT checkpoints: No
    # per-process OCDBT checkpoint subdirs found in <tmp dir>" (the save writes no OCDBT)
    from tests.convert import hf_tiny
    hf_tiny.llama(tmp_path / "hf")
    with caplog.at_level("WARNING"):
        assert main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ck")]) == 0
    assert (tmp_path / "ck" / "vlm_jax_convert.json").exists()
    assert "OCDBT" not in caplog.text
