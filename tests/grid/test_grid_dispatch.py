"""Dispatch without polling: a launcher's `wait` returns as soon as one of its jobs ends
(a process exits, a worker replies), so the runner hands the freed slot its next job at
once. The waits below are bounded far above what a wake-up takes (60 s): a missing
wake-up fails them, a loaded machine does not."""
from tests.grid.conftest import PY
from vlm_jax.grid.launchers import Launcher, StepsHandle


def test_a_process_exit_wakes_the_waiter_at_once(tmp_path):
    launcher = Launcher(str(tmp_path), 1)
    log = str(tmp_path / "job" / "run.log")
    # two steps: the second starts when the runner polls the handle after the first ends
    h = StepsHandle([[[PY, "-c", "print('one')"]], [[PY, "-c", "print('two')"]]], log,
                    None, launcher.wakeup)
    wakes = 0
    while h.poll() is None:
        assert launcher.wait(60), "no wake-up: the runner would sit out its poll"
        wakes += 1
    assert h.poll() == 0 and 1 <= wakes <= 2
    assert open(log).read().splitlines()[-1] == "two"
    # a failing step ends the job with its exit code, and wakes the waiter too
    h = StepsHandle([[[PY, "-c", "raise SystemExit(3)"]], [[PY, "-c", "pass"]]], log, None,
                    launcher.wakeup)
    while h.poll() is None:
        assert launcher.wait(60)
    assert h.poll() == 3
    assert not launcher.wait(0.01)   # nothing left to report: no spurious wake-up
