"""`python -m vlm_jax.grid.preload MODULE ARGS`: the imports happen first, the work only on
"go"; end of input runs nothing (the runner arms analysis entries this way)."""
import os
import subprocess
import time

from tests.grid.conftest import PY, REPO, cli_env
from vlm_jax.grid import preload


def _armed(*args):
    return subprocess.Popen([PY, "-m", "vlm_jax.grid.preload", *args], cwd=REPO,
                            env=cli_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_go_runs_the_cli_and_end_of_input_runs_nothing(tmp_path):
    root = str(tmp_path / "nogrid")
    os.makedirs(root)
    # "go": the module's main(ARGS) runs with its own exit code and output
    p = _armed("vlm_jax.grid", "status", "--root", root)
    time.sleep(0.2)
    assert p.poll() is None          # imported, waiting for "go"
    out, _ = p.communicate("go\n", timeout=120)
    assert p.returncode == 2 and "holds no grid" in out, out
    # end of input (the runner stopped): exits 3 without running anything
    p = _armed("vlm_jax.grid", "status", "--root", root)
    out, _ = p.communicate("", timeout=120)
    assert p.returncode == preload.NOT_STARTED and "holds no grid" not in out, out
    # a module without a CLI fails at once, before waiting
    p = _armed("vlm_jax.no_such_module")
    out, _ = p.communicate("go\n", timeout=120)
    assert p.returncode == 1 and "No module named" in out, out


def test_serve_runs_many_commands_after_one_import(tmp_path):
    """`--serve MODULE`: one reply per command, each command's output in its own log;
    a failing command (exit code, exception) does not stop the next one."""
    import json
    root = str(tmp_path / "nogrid")
    os.makedirs(root)
    p = subprocess.Popen([PY, "-m", "vlm_jax.grid.preload", "--serve", "vlm_jax.grid"],
                         cwd=REPO, env=cli_env(), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = [str(tmp_path / f"{i}.log") for i in range(3)]
    cmds = [["status", "--root", root],              # exit 2, message in the log
            ["no-such-command"],                     # argparse: SystemExit(2)
            ["status", "--root", root]]              # still served after the failures
    out, err = p.communicate("".join(json.dumps({"argv": c, "log": l}) + "\n"
                                     for c, l in zip(cmds, logs)), timeout=120)
    assert p.returncode == 0, err
    assert [json.loads(x) for x in out.splitlines()] == [{"rc": 2}] * 3, out
    assert "holds no grid" in open(logs[0]).read()
    assert "invalid choice" in open(logs[1]).read()
    assert "holds no grid" in open(logs[2]).read()
