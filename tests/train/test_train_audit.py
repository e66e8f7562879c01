"""`python -m vlm_jax.main` run the way a user runs it, with the wrong thing in --config:
one error line that names the file and what to do, exit code 2, nothing written (the
config is rejected before the trainer is imported, so each case is ~1 s)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.compiled import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _main(*args):
    return subprocess.run([sys.executable, "-m", "vlm_jax.main", *args], cwd=ROOT,
                          env=subprocess_env(ROOT), capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("override", [[], ["--config.train.steps=3"]])
@pytest.mark.parametrize("spec,want", [
    ("configs/nope.py:run", ["no config file 'configs/nope.py'"]),
    ("configs/demo.py:tiny", ["is a grid, not one run",
                              "python -m vlm_jax.grid run configs/demo.py:tiny"]),
])
def test_bad_config_is_one_named_error(tmp_path, override, spec, want):
    """A missing config file, or a grid config given to the single-run CLI: exit 2, one
    message naming it (and the grid CLI to use), nothing written."""
    w = tmp_path / "w"
    p = _main("--config", spec, "--workdir", str(w), *override)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    for text in want:
        assert text in p.stderr
    assert not w.exists()


def test_help_keeps_the_usage_lines():
    # the module docstring is --help's text: its shell continuations must stay line breaks
    from vlm_jax import main
    assert "--workdir runs/x \\\n" in main.__doc__


def test_design_single_run_command_is_one_run(tmp_path):
    # DESIGN.md's one-run command names the point without a preset: it must be that run
    # (before: the grid preset, whose `grid` config main could not train)
    from configs import compositional
    c = compositional.get_config("vit=L14,llm=vicuna7b,data=cc12m,n=3M")
    assert "grid" not in c and c.name == "comp_L14_vicuna7b_cc12m_3M"
    assert c.data.n == 3_000_000 and c.model.vision.width == 1024
    assert "grid" in compositional.get_config(None)
    assert "grid" in compositional.get_config("sweep=0,feature_cache=0")
    with pytest.raises(ValueError, match="vit='Q'"):   # was silently ignored by the grid
        compositional.get_config("vit=Q")
    # through the CLI, without weights: the error is about the missing weights
    w = tmp_path / "w"
    p = subprocess.run(
        [sys.executable, "-m", "vlm_jax.main",
         "--config", "configs/compositional.py:vit=L14,llm=vicuna7b,data=cc12m,n=3M",
         "--workdir", str(w)], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**subprocess_env(ROOT), "VLM_JAX_WEIGHTS": str(tmp_path / "weights")})
    assert p.returncode == 2, p.stderr[-2000:]
    assert "init_from=" in p.stderr and "does not exist" in p.stderr


def test_bad_override_value_message_keeps_its_quotes(tmp_path):
    p = _main("--config", "configs/demo.py:run", "--workdir", str(tmp_path / "w"),
              "--config.train.steps=abc")
    assert p.returncode == 2
    assert "--config.train.steps=abc: invalid literal for int() with base 10: 'abc'\n" in p.stderr


def test_imply_preset():
    from configs.common import imply_preset
    keys = ("vit", "llm", "data", "n")
    assert imply_preset("vit=L14,n=3M", keys) == "run,vit=L14,n=3M"
    for same in (None, "", "sweep=0", "grid,vit=L14", "preset=grid,vit=L14", "run,vit=L14"):
        assert imply_preset(same, keys) == same


def test_workdir_that_is_a_file_is_named(tmp_path):
    f = tmp_path / "afile"
    f.write_text("")
    p = _main("--config", "configs/demo.py:run", "--workdir", str(f))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"--workdir {f} is a file, not a directory" in p.stderr


@pytest.mark.parametrize("flags,want", [
    (["--num_processes", "2"], "multi-host needs all of --coordinator_address"),
    (["--num_processes", "2", "--process_id", "5", "--coordinator_address", "localhost:1"],
     "process_id < num_processes")])
def test_bad_multihost_flags_are_one_error_line(tmp_path, flags, want):
    p = _main("--config", "configs/demo.py:run", "--workdir", str(tmp_path / "w"), *flags)
    assert p.returncode == 2 and want in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_missing_init_from_is_named_before_anything_is_written(tmp_path):
    """A local init_from that does not exist fails before config.json is written, so the
    same workdir accepts the corrected path afterwards."""
    from configs import demo
    from vlm_jax.train import trainer
    wd = tmp_path / "run"
    c = demo.get_config("run,vit=S,llm=S,n=32,steps=1,batch=8,eval_n=8")
    c.model.vision.init_from = str(tmp_path / "no_such_vit")
    with pytest.raises(FileNotFoundError, match=r"model.vision.init_from=.*no_such_vit.*"
                                                r"does not exist"):
        trainer.Run(c, str(wd))
    assert not (wd / "config.json").exists()
    c.model.vision.init_from = "gs://bucket/vit"        # remote: checked when loaded
    trainer._check_init_from(c)
