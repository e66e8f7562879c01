"""`python -m vlm_jax.data convert` into an --out that holds an earlier conversion: the
old part files must not survive next to the new ones (a '*.array_record' pattern would
read both as one data set)."""
from __future__ import annotations

import json
import os

from vlm_jax.data.__main__ import main


def _run(capsys, *argv):
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out) if rc == 0 else None), cap.err


def test_convert_refuses_then_replaces_an_earlier_conversion(tmp_path, capsys):
    out = str(tmp_path / "ar")
    conv = ("convert", "--from", "synthetic", "--to", "arrayrecord", "--out", out)
    rc, first, _ = _run(capsys, *conv, "--limit", "6", "--records-per-file", "2")
    assert rc == 0 and len(first["files"]) == 3
    rc, _, err = _run(capsys, *conv, "--limit", "2")
    assert rc == 2 and "already holds 3 ArrayRecord file(s)" in err and "--force" in err
    assert sorted(f for f in os.listdir(out) if f.endswith(".array_record")) == first["files"]
    rc, second, _ = _run(capsys, *conv, "--limit", "2", "--force")
    assert rc == 0 and second["files"] == ["part-00000.array_record"]
    assert sorted(f for f in os.listdir(out) if not f.startswith(".")) == \
        ["part-00000.array_record", "stats.json"]
    rc, st, _ = _run(capsys, "stats", "--format", "arrayrecord", "--path",
                     os.path.join(out, "*.array_record"))
    assert rc == 0 and st["samples"] == 2


def test_convert_out_that_is_a_file_is_named(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("")
    rc, _, err = _run(capsys, "convert", "--from", "synthetic", "--to", "arrayrecord",
                      "--out", str(f), "--limit", "2")
    assert rc == 2 and "is a file, not a directory" in err     # was a traceback


def test_bad_counts_are_usage_errors(tmp_path, capsys):
    import pytest
    for argv, want in (
            (["convert", "--from", "synthetic", "--to", "arrayrecord", "--out",
              str(tmp_path / "o"), "--limit", "3", "--records-per-file", "0"],
             "--records-per-file 0: give at least 1"),       # was a ZeroDivisionError
            (["stats", "--format", "synthetic", "--limit", "-3"],
             "--limit -3: give 0")):                          # was 0 samples, silently
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and want in capsys.readouterr().err
