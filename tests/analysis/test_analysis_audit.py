"""`python -m vlm_jax.analysis` on a grid root the way DESIGN.md runs it (`--runs ROOT`
without `--stage`): a root holding several stages (pretraining, grid, native) says that
their losses are being analysed together and how to keep one."""
from vlm_jax.analysis.__main__ import main

from tests.analysis.test_analysis_cli import _write_results


def test_mixed_stages_without_stage_warn(tmp_path, capsys):
    root = str(tmp_path / "root")
    _write_results(root)    # stage "grid" rows and one done "vit" pretraining row
    out = str(tmp_path / "opt")
    main(["optimal", "--runs", root, "--out", out])
    err = capsys.readouterr().err
    assert "holds done runs of several stages (grid, vit) and no --stage was given" in err
    assert "pass --stage STAGE" in err
    main(["optimal", "--runs", root, "--stage", "grid", "--out", out])
    assert "warning" not in capsys.readouterr().err


def test_out_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    import pytest
    f = tmp_path / "afile"
    f.write_text("")
    with pytest.raises(SystemExit) as e:    # was a FileExistsError traceback
        main(["fit", "--csv", str(tmp_path / "x.csv"), "--out", str(f)])
    assert e.value.code == 2
    assert f"--out {f} is a file, not a directory" in capsys.readouterr().err


def test_bad_budgets_and_negative_n_boot_are_usage_errors(tmp_path, capsys):
    import pytest
    base = ["fit", "--csv", str(tmp_path / "x.csv"), "--out", str(tmp_path / "o")]
    for extra, want in ((["--budgets", "1e20,x"], "--budgets '1e20,x': give a comma list"),
                        (["--n-boot", "-5"], "--n-boot -5: give 0")):
        with pytest.raises(SystemExit) as e:   # budgets: was a ValueError traceback after
            main(base + extra)                 # the fits; n-boot < 0 was taken silently
        assert e.value.code == 2 and want in capsys.readouterr().err
