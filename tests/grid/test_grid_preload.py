"""`python -m vlm_jax.grid.preload --serve MODULE`: the runner's analysis server."""
import os
import subprocess

from tests.grid.conftest import PY, REPO, cli_env


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
