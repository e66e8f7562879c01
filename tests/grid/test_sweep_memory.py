"""A WSD sweep run in one process hands its branch points and setup to the branches in
memory (`trainer.SweepMemory`): the branches end bit-identical to the checkpoint-restore
path (losses, eval loss, counters, their final checkpoints), and a sweep interrupted
after its stable run, or inside a branch, still resumes from the checkpoints on disk."""
import json
import logging
import os

import numpy as np
import pytest

from configs import demo
from vlm_jax.grid import sweep
from vlm_jax.train import checkpoint as ckpt
from vlm_jax.train import trainer

pytestmark = pytest.mark.timeout(600)
SIZES = (32, 64, 128)    # batch 8: 4, 8, 16 steps, one epoch each; branch points 2 and 4
MEMORY_LOG = "(kept in memory)"


def _cfg(n):
    c = demo.get_config(f"run,vit=S,llm=S,n={n},batch=8,eval_n=16")
    c.optim.update(lr=3e-3, decay_frac=0.5, warmup_frac=0.25)
    c.train.log_every_steps = 1
    return c


def _entries(root):
    return [(_cfg(n), os.path.join(root, f"n{n}")) for n in SIZES]


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")}
                for line in f]


def _norm(x, root):
    """`x` (JSON) with the root's path replaced, so two roots' files compare."""
    return json.loads(json.dumps(x).replace(root, "ROOT"))


def _final_checkpoint(workdir, root):
    """(train state leaves as bytes, iterator state, meta) of the run's last checkpoint."""
    mgr = ckpt.make_manager(workdir, read_only=True)
    try:
        step = mgr.latest_step()
        state = ckpt._restore_host(mgr, step, ckpt.STATE)
        meta = mgr.restore(step, args=ckpt.ocp.args.Composite(
            meta=ckpt.ocp.args.JsonRestore()))["meta"]
    finally:
        mgr.close()
    data = os.path.join(workdir, "checkpoints", str(step), ckpt.DATA)
    with open(os.path.join(data, "process_0-of-1.json")) as f:
        it_state = f.read()
    meta = {k: v for k, v in meta.items() if k != "wall_time_s"}
    leaves = [(np.asarray(x).dtype.str, np.asarray(x).shape, np.asarray(x).tobytes())
              for x in ckpt.jax.tree.leaves(state)]
    return step, leaves, it_state, _norm(meta, root)


def _outcome(root):
    """Everything a run of the sweep leaves that must not depend on the path taken."""
    out = {}
    for n in SIZES:
        wd = os.path.join(root, f"n{n}")
        with open(os.path.join(wd, "result.json")) as f:
            res = json.load(f)
        res = {k: v for k, v in res.items() if k not in ("timings", "wall_time_s")}
        out[n] = (_norm(res, root), _metrics(wd), _final_checkpoint(wd, root))
    return out


def _memory_branches(caplog):
    return [r.getMessage() for r in caplog.records if MEMORY_LOG in r.getMessage()]


def test_sweep_memory(tmp_path, caplog, monkeypatch, subtests):
    """One test function (the checks share the compiled programs: under pytest-xdist
    separate tests may land in separate worker processes and compile twice)."""
    caplog.set_level(logging.INFO, logger="vlm_jax.train")
    for check in (in_memory_branches_match_checkpoint_restore,
                  memory_limit_and_interrupted_sweep_resume_from_disk):
        with subtests.test(check.__name__):
            (tmp_path / check.__name__).mkdir()
            check(tmp_path / check.__name__, caplog, monkeypatch)


def in_memory_branches_match_checkpoint_restore(tmp_path, caplog, monkeypatch):
    caplog.clear()
    disk, mem = str(tmp_path / "disk"), str(tmp_path / "mem")
    # the checkpoint-restore path: every branch opens the stable run's checkpoint
    ref = sweep.run_sweep(_entries(disk), run_fn=trainer.run)
    assert not _memory_branches(caplog)
    # the worker's path: branch points and setup handed over in memory
    got = sweep.run_sweep(_entries(mem))
    assert len(_memory_branches(caplog)) == 2, caplog.text
    for r in got[1:]:
        assert r["branched_from"].startswith(os.path.join(mem, "n128") + ":")
        # the stable run's setup was adopted: no init, optimizer init, compile, features
        assert not {"init", "opt_init", "compile", "feature_cache"} & set(r["timings"])
    assert [r["steps"] for r in got] == [16, 4, 8] == [r["steps"] for r in ref]
    a, b = _outcome(disk), _outcome(mem)
    for n in SIZES:
        assert a[n][0] == b[n][0], n                    # result.json
        assert a[n][1] == b[n][1], n                    # every step's losses, lr, counters
        assert a[n][2] == b[n][2], n                    # the final checkpoint, bit for bit
    # the check has teeth: the branches trained (their final checkpoints differ)
    assert a[32][2][1] != a[64][2][1] != a[128][2][1]
    assert min(m["step"] for m in a[32][1]) == 3 and min(m["step"] for m in a[64][1]) == 5
    # the branch points are still on disk (another process's branches need them)
    assert sorted(os.listdir(os.path.join(mem, "n128", "checkpoints"))) == ["16", "2", "4"]


def memory_limit_and_interrupted_sweep_resume_from_disk(tmp_path, caplog, monkeypatch):
    caplog.clear()
    ref, root = str(tmp_path / "ref"), str(tmp_path / "run")
    # no state kept (limit 0): the branches adopt the setup and restore from disk
    monkeypatch.setenv("VLM_JAX_SWEEP_MEMORY_MB", "0")
    sweep.run_sweep(_entries(ref))
    assert not _memory_branches(caplog) and "is not kept in memory" in caplog.text
    monkeypatch.delenv("VLM_JAX_SWEEP_MEMORY_MB")
    expected = _outcome(ref)

    # 1) killed between the stable run and its first branch
    def killed(config, workdir, **kw):
        if config.train.get("branch_from"):
            raise KeyboardInterrupt
        return trainer.run(config, workdir, **kw)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(_entries(root), run_fn=killed, in_memory=True)
    assert os.path.exists(os.path.join(root, "n128", "result.json"))
    # 2) run again: the stable run is done; the first branch is preempted (SIGTERM) after
    # one step, saving its own checkpoint, which ends the sweep
    caplog.clear()
    real = trainer._StopFlag

    class StopOnce(real):
        """SIGTERM seen at the first step check of this sweep's first run that trains."""
        fired = False

        @property
        def set(self):
            fire, StopOnce.fired = not StopOnce.fired, True
            return fire

        @set.setter
        def set(self, value):
            pass
    monkeypatch.setattr(trainer, "_StopFlag", StopOnce)
    res = sweep.run_sweep(_entries(root))
    monkeypatch.setattr(trainer, "_StopFlag", real)
    assert [r["status"] for r in res] == ["done", "preempted"]
    assert not os.path.exists(os.path.join(root, "n64"))
    assert not _memory_branches(caplog)      # the stable run was not in this process
    assert os.listdir(os.path.join(root, "n32", "checkpoints")) == ["3"]
    # 3) the preempted branch resumes from its own checkpoint, adopting a setup
    mem = trainer.SweepMemory()
    entries = _entries(root)
    (stable, *_) = items = sweep.plan_group([(wd, c, wd) for c, wd in reversed(entries)])
    assert stable.role == "stable"
    assert trainer.run(stable.apply(entries[-1][0]), stable.workdir, sweep=mem)["steps"] == 16
    r = trainer.run(items[1].apply(entries[0][0]), items[1].workdir, sweep=mem)
    assert mem.stats["setups_adopted"] == 1 and mem.stats["taken"] == 0
    assert r["status"] == "done" and r["steps"] == 4
    # 4) the last branch: from the stable run's checkpoint, with its own setup
    caplog.clear()
    assert [r["status"] for r in sweep.run_sweep(_entries(root))] == ["done"] * 3
    assert not _memory_branches(caplog)
    got = _outcome(root)
    for n in SIZES:
        assert got[n] == expected[n], n
