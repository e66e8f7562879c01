"""Runs an expanded grid: dependencies, resume, failure isolation, progress, results.

`run_grid(grid, root, launcher)`:
1. refuses a root that holds a different grid (another name, a stage defined differently:
   axis order, arg, needs, sweep; `registry.check_root` says what differs), records the
   grid in ROOT/grid.json;
2. skips every run whose result.json says done; a started-but-unfinished run is simply
   launched again and resumes from its last checkpoint (the trainer's contract);
3. launches jobs whose dependencies are done, up to `launcher.parallel` at a time, in the
   order of `schedule` (critical path, stage, biggest estimated job first); a job
   that fails is marked (grid_status.json with its log tail) and the rest go on; runs that
   need a failed run are marked skipped, saying which run and why;
4. prints progress (done/total, failed, running, ETA) after every finished job;
5. writes ROOT/results.csv after every finished job (atomic) and runs the grid's analysis
   entries: one whose stage's runs are all done starts in the background while the other
   stages' jobs go on (one at a time); the rest (and `report`, which combines the others)
   run at the end on the stage's done runs. They run in one analysis server process
   (`vlm_jax.grid.preload --serve`: the analysis imports paid once, started while jobs
   train, as soon as an entry's stage has no job left to start), and a `fit` entry with
   `--group-cols` fits each group as soon as its runs are done (`fit --partial` into the
   entry's `--cache-dir`, which the entry then reuses).
Dispatch does not poll: `launcher.wait` returns when a job ends, the freed slot takes its
next job at once and the ended job's bookkeeping (markers, progress, results.csv, timings)
follows; the last stage's analysis starts as its last job ends.
The runner's timeline (start, planned, jobs done, analysis start/end, finished) goes to
ROOT/runner_events.jsonl and each job's line in ROOT/timings.jsonl names its slot.
Ctrl-C stops the running jobs with SIGTERM (they checkpoint) and leaves everything
resumable: the next `run` picks up where this one stopped.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import socket
import subprocess
import sys
import time
from typing import Callable, Mapping, Sequence

from vlm_jax.grid import registry
from vlm_jax.grid.expand import Grid, GridError, Run
from vlm_jax.grid.launchers import Job, Launcher, LineServer, format_command, make_jobs


@dataclasses.dataclass
class Summary:
    total: int = 0
    done: int = 0                 # done at the end (including skipped-as-done)
    already_done: int = 0         # done before this invocation
    ran: int = 0                  # runs launched by this invocation
    failed: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    interrupted: bool = False
    analysis_failed: list[str] = dataclasses.field(default_factory=list)
    wall_time_s: float = 0.0

    @property
    def ok(self) -> bool:
        return (not self.failed and not self.skipped and not self.interrupted
                and not self.analysis_failed)


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (
        f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def analysis_argv(a, root: str, python: Sequence[str]) -> list[str]:
    if a.cmd == "report":  # combines every ROOT/report/*/ into ROOT/report/report.md
        return [*python, "-m", "vlm_jax.analysis", "report", "--runs", root, "--out",
                os.path.join(root, "report"), *a.args]
    out = os.path.join(root, "report", a.out)
    # fits are kept by their points: the `--partial` passes while the stage trains fill
    # the cache, the entry itself reuses them
    cache = ["--cache-dir", os.path.join(out, FIT_CACHE)] if a.cmd == "fit" else []
    return [*python, "-m", "vlm_jax.analysis", a.cmd, "--runs", root, "--out", out,
            "--stage", a.stage, *a.args, *cache]


FIT_CACHE = ".fit_cache"


def _group_cols(args: Sequence[str]) -> list[str]:
    """The `--group-cols` of a fit entry's arguments."""
    for i, x in enumerate(args):
        if x == "--group-cols" and i + 1 < len(args):
            return [c for c in args[i + 1].split(",") if c]
        if x.startswith("--group-cols="):
            return [c for c in x.split("=", 1)[1].split(",") if c]
    return []


def dry_run(grid: Grid, root: str, launcher: Launcher, out=sys.stdout) -> list[str]:
    """Prints (and returns) every command a real `run` would execute, nothing else."""
    lines = []
    emit = lambda s: (lines.append(s), print(s, file=out))  # noqa: E731
    runs = grid.by_name()
    todo = [r for r in grid.runs if not registry.is_done(root, r)]
    emit(f"# grid {grid.name}: {len(grid.runs)} runs, {len(grid.runs) - len(todo)} done, "
         f"{len(todo)} to run; launcher {launcher.name}, parallel {launcher.parallel}")
    for argv in launcher.setup_commands():
        emit(format_command(argv))
    env = launcher.env(0) if not launcher.remote else {}
    env_shown = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    slot_envs = [launcher.env(i) for i in range(launcher.parallel)] if env else []
    per_slot = sorted({k for e in slot_envs for k in e if e.get(k) != env.get(k)})
    if per_slot:   # e.g. the gpu launcher's CUDA_VISIBLE_DEVICES per slot
        emit(f"# each job runs in the first free slot; the commands below show slot 0's "
             f"environment; per slot: " + "; ".join(
                 f"{i}: " + " ".join(f"{k}={e.get(k, '')}" for k in per_slot)
                 for i, e in enumerate(slot_envs)))
    todo_names = {r.name for r in todo}
    for job in make_jobs(todo, [r for r in grid.runs if r.name not in todo_names]):
        emit(f"# {job.name}" + (f"  (needs {', '.join(job.deps)})" if job.deps else ""))
        for step in launcher.job_commands(job, runs, dry_run=True):
            for argv in step:
                emit(format_command(argv, env_shown))
    for a in grid.analysis:
        emit(f"# analysis {a.cmd} {a.stage}")
        emit(format_command(analysis_argv(a, os.path.abspath(root), [sys.executable])))
    return lines


class _Progress:
    def __init__(self, total: int, already: int, parallel: int, log: Callable[[str], None]):
        self.total, self.done0, self.parallel, self.log = total, already, parallel, log
        self.t0 = time.time()
        self.finished = 0
        self.run_seconds = 0.0

    def report(self, done: int, failed: int, skipped: int, running: int, last: str):
        el = time.time() - self.t0
        left = self.total - done - failed - skipped
        eta = ""
        if self.finished and left:
            per = el / self.finished  # observed throughput (includes parallelism)
            eta = f", ETA {_fmt_s(per * left)}"
        self.log(f"[grid] {done}/{self.total} done, {failed} failed, {skipped} skipped, "
                 f"{running} running, {_fmt_s(el)} elapsed{eta} | {last}")


def run_grid(grid: Grid, root: str, launcher: Launcher, *, retry_failed: bool = True,
             analysis: bool = True, log: Callable[[str], None] | None = None,
             poll_s: float = 0.2, allow_grid_change: bool = False) -> Summary:
    """Runs every run of `grid` that is not done; see the module docstring.
    `allow_grid_change`: accept a root whose recorded stage definitions differ
    (`registry.check_root`)."""
    log = log or (lambda s: print(s, flush=True))
    root = os.path.abspath(root)
    t0 = time.time()
    os.makedirs(root, exist_ok=True)
    registry.check_root(root, grid, allow_change=allow_grid_change)
    with registry.RootLock(root):
        return _run_locked(grid, root, launcher, retry_failed, analysis, log, poll_s, t0)


def _run_locked(grid, root, launcher, retry_failed, analysis, log, poll_s, t0) -> Summary:
    registry.append_event(root, "start", t0=round(t0, 3))
    full = registry.record_grid(root, grid)
    csv_grid = registry.load_recorded_grid(root)  # results.csv covers every known run
    csv_done: dict[str, dict] = {}   # rows of done runs (read once, not at every rewrite)
    runs = grid.by_name()
    s = Summary(total=len(grid.runs))
    state: dict[str, str] = {}
    for r in grid.runs:
        st, _ = registry.run_state(root, r)
        if st == "done":
            state[r.name] = "done"
        elif st == "failed" and not retry_failed:
            state[r.name] = "failed"
            s.failed.append(r.name)
        else:
            state[r.name] = "todo"
    s.already_done = sum(v == "done" for v in state.values())
    todo_runs = [r for r in grid.runs if state[r.name] == "todo"]
    jobs = make_jobs(todo_runs, [r for r in grid.runs if state[r.name] == "done"])
    if s.already_done:
        log(f"[grid] {grid.name}: {s.already_done}/{s.total} runs already done "
            f"(skipped), {len(todo_runs)} to run")
    else:
        log(f"[grid] {grid.name}: {s.total} runs in {len(full['runs'])} known, "
            f"{len(todo_runs)} to run")
    for argv in launcher.setup_commands():
        log(f"[grid] setup: {format_command(argv)}")
        subprocess.run(argv, check=True)
    registry.append_event(root, "planned", jobs=len(jobs), parallel=launcher.parallel)
    prog = _Progress(s.total, s.already_done, launcher.parallel, log)
    # the analysis processes share the workers' compilation cache (the fits' programs)
    cache_env = {k: v for k, v in launcher.env(0).items()
                 if k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    analyses = _Analyses(grid, root, log, cache_env) if analysis else None
    pending = schedule(jobs, grid)
    running: dict[int, tuple[Job, object, float]] = {}   # slot -> (job, handle, start)

    def counts():
        return (sum(v == "done" for v in state.values()),
                sum(v == "failed" for v in state.values()),
                sum(v == "skipped" for v in state.values()))

    def settle(job: Job) -> str:
        """The state of a job's runs from their result.json (what dispatch needs)."""
        for r in job.runs:
            if registry.is_done(root, r):
                state[r.name] = "done"
            else:
                state[r.name] = "failed"
                s.failed.append(r.name)
        return "done" if all(state[r.name] == "done" for r in job.runs) else "FAILED"

    def record(job: Job, rc: int, started: float, ended: float, info: Mapping, slot: int,
               status: str):
        """A settled job's bookkeeping (after its slot took the next job): markers,
        progress, results.csv, its timings.jsonl line (`seconds`: until the runner saw
        it end)."""
        prog.finished += len(job.runs)
        log_path = _log_path(root, job)
        tail = registry.log_tail(log_path) if status == "FAILED" else ""
        for r in job.runs:
            if state[r.name] == "done":
                registry.clear_mark(root, r)
            else:
                res = registry.read_result(root, r)
                why = (f"result.json status {res.get('status')!r}" if res
                       else f"exit code {rc}")
                registry.mark(root, r, "failed", why, log=log_path, log_tail=tail,
                              seconds=round(ended - started, 1))
        d, f, k = counts()
        prog.report(d, f, k, len(running), f"{job.name} {status} in "
                    f"{_fmt_s(ended - started)}")
        if status == "FAILED":
            log(f"[grid]   {job.name} failed ({rc=}); log {log_path}; last lines:\n"
                + "\n".join("[grid]   | " + ln for ln in tail.splitlines()[-8:]))
        registry.write_results_csv(root, csv_grid, csv_done)
        registry.append_timing(root, job=job.name, runs=[r.name for r in job.runs], rc=rc,
                               start=started, seconds=round(ended - started, 3),
                               status=status.lower(), slot=slot, **info)

    def skip_unreachable():
        """Skips jobs whose dependencies failed (transitively: skipped counts as failed)."""
        for job in list(pending):
            bad = [d for d in job.deps if state.get(d) in ("failed", "skipped")
                   or (d not in state and not _dep_done(root, runs, d))]
            if bad:
                pending.remove(job)
                for r in job.runs:
                    why = f"needs {bad[0]}, which {state.get(bad[0], 'is not done')}"
                    state[r.name] = "skipped"
                    s.skipped.append(r.name)
                    registry.mark(root, r, "skipped", why)
                log(f"[grid] skip {job.name}: needs {bad[0]}, which "
                    f"{state.get(bad[0], 'is not done')}")

    def dispatch():
        """Starts startable jobs (in `pending` order) on the free slots."""
        free = [i for i in range(launcher.parallel) if i not in running]
        for job in list(pending):
            if not free:
                break
            if all(state.get(d) == "done" or (d not in state and _dep_done(root, runs, d))
                   for d in job.deps):
                pending.remove(job)
                slot = free.pop(0)
                log_path = _log_path(root, job)
                log(f"[grid] start {job.name}" + (f" ({len(job.runs)} runs, {job.sweep} "
                                                  "sweep)" if job.sweep else ""))
                started = time.time()
                handle = launcher.start(job, runs, slot, log_path)
                running[slot] = (job, handle, started)
                for r in job.runs:
                    registry.mark(root, r, "running", pid=os.getpid(), host=socket.gethostname())
                s.ran += len(job.runs)

    wait = getattr(launcher, "wait", None) or time.sleep
    ended: list[tuple] = []   # settled jobs whose bookkeeping is left
    try:
        skip_unreachable()
        dispatch()
        while pending or running:
            if not running:
                # nothing can start and nothing runs: the rest waits on runs outside
                # the selection that are not done
                for job in pending:
                    for r in job.runs:
                        state[r.name] = "skipped"
                        s.skipped.append(r.name)
                        registry.mark(root, r, "skipped", "a dependency is not done")
                pending.clear()
                break
            wait(poll_s)   # returns as soon as a job ends (launcher.wakeup)
            for slot, (job, handle, started) in list(running.items()):
                rc = handle.poll()
                if rc is not None:
                    t_end = time.time()
                    del running[slot]
                    ended.append((job, rc, started, t_end, getattr(handle, "info", {}),
                                  slot, settle(job)))
            if ended:   # the freed slots take their next jobs first, bookkeeping after
                skip_unreachable()
                dispatch()
            while ended:
                record(*ended[0])
                ended.pop(0)
            if analyses is not None:   # also after the last job: its entry starts now
                analyses.start_ready(state, pending)
    except KeyboardInterrupt:
        s.interrupted = True
        log(f"[grid] interrupted: stopping {len(running)} running job(s) (they checkpoint on "
            "SIGTERM); run the same command again to resume")
        for job, handle, _ in running.values():
            handle.terminate()
            for r in job.runs:
                registry.clear_mark(root, r)
        running.clear()
        for e in ended:   # jobs that ended before the interrupt keep their timing line
            record(*e)
        if analyses is not None:
            analyses.stop()
    finally:
        registry.append_event(root, "jobs_done", interrupted=s.interrupted)
        launcher.close()
        registry.write_results_csv(root, csv_grid, csv_done)
    s.done = sum(v == "done" for v in state.values())
    if analyses is not None and not s.interrupted:
        s.analysis_failed = analyses.finish(state)
    s.wall_time_s = time.time() - t0
    registry.append_event(root, "finished", wall_time_s=round(s.wall_time_s, 3))
    log(f"[grid] finished: {s.done}/{s.total} done, {len(s.failed)} failed, "
        f"{len(s.skipped)} skipped, in {_fmt_s(s.wall_time_s)}; results: "
        f"{os.path.join(root, registry.RESULTS_CSV)}")
    return s


def job_costs(jobs: Sequence[Job]) -> dict[str, float]:
    """Estimated work of each job: the sum over its runs of steps x batch x forward FLOPs
    per example (`vlm_jax.train.flops`; coarse: a WSD branch's shared steps and the
    backward pass are not told apart, which keeps jobs of one stage comparable). 0 where a
    config does not build or its model has no FLOP count: such jobs keep their grid
    order."""
    from vlm_jax.grid import expand
    from vlm_jax.train import flops as flops_lib
    out, modules = {}, {}   # each config file imported once for all jobs
    for job in jobs:
        total = 0.0
        try:
            for cfg in expand.build_run_configs(job.runs, modules).values():
                per = sum(flops_lib.forward_per_example(cfg).values())
                total += per * int(cfg.train.steps) * int(cfg.train.batch_size)
        except Exception:  # noqa: BLE001 - an estimate only; the job still runs
            total = 0.0
        out[job.name] = total
    return out


def schedule(jobs: Sequence[Job], grid: Grid, costs: Mapping[str, float] | None = None
             ) -> list[Job]:
    """The order jobs start in (each free slot takes the first startable one):
    1. critical path first: jobs more runs wait on (pretraining feeding the grid);
    2. then stage by stage, in grid order (a stage's analysis can start while the next
       stage's jobs run);
    3. within a stage, the biggest estimated job first (`job_costs`; longest-processing-
       time-first leaves the short jobs for the end, so the slots finish together), where
       jobs of equal cost (the same programs, e.g. the clean and noisy twins of one
       (vit, llm)) go to different waves: the first of each equal-cost group, by cost,
       then the second ones, ... (the later twin loads what the first compiled);
    ties keep grid order."""
    costs = job_costs(jobs) if costs is None else costs
    waiting = dependants(grid.runs)
    stage_pos = {}
    for r in grid.runs:
        stage_pos.setdefault(r.stage, len(stage_pos))
    seen: dict[tuple, int] = {}
    twin = {}
    for j in jobs:
        k = (j.runs[0].stage, round(costs.get(j.name, 0.0), 3))
        twin[j.name] = seen.get(k, 0)
        seen[k] = twin[j.name] + 1
    return sorted(jobs, key=lambda j: (
        -len(set().union(*(waiting[r.name] for r in j.runs))),
        stage_pos[j.runs[0].stage], twin[j.name], -costs.get(j.name, 0.0)))


def dependants(runs) -> dict[str, set[str]]:
    """Run name -> the names of every run that needs it, directly or not."""
    direct: dict[str, set[str]] = {r.name: set() for r in runs}
    for r in runs:
        for d in r.deps:
            direct.setdefault(d, set()).add(r.name)
    out: dict[str, set[str]] = {}

    def visit(name):
        if name not in out:
            out[name] = set()
            for child in direct.get(name, ()):
                out[name] |= {child} | visit(child)
        return out[name]
    for name in direct:
        visit(name)
    return out


def _dep_done(root: str, runs: Mapping[str, Run], name: str) -> bool:
    r = runs.get(name)
    return r is not None and registry.is_done(root, r)


def _log_path(root: str, job: Job) -> str:
    return os.path.join(root, job.runs[0].workdir, registry.LOG)


ANALYSIS_MODULE = "vlm_jax.analysis"


class _ProcJob:
    """An analysis command as a process of its own (output appended to its log)."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], log_path: str):
        self.log_path = log_path
        self.f = open(log_path, "ab")
        self.f.write(f"$ {format_command(argv)}\n".encode())
        self.f.flush()
        self.proc = subprocess.Popen(list(argv), stdout=self.f, stderr=subprocess.STDOUT,
                                     env=dict(env), stdin=subprocess.DEVNULL)
        self.died = False

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is not None:
            self.f.close()
        return rc

    def wait(self) -> int:
        self.proc.wait()
        return self.poll()

    def terminate(self) -> None:
        self.proc.terminate()
        self.wait()


class _AnalysisServer(LineServer):
    """One `python -m vlm_jax.grid.preload --serve vlm_jax.analysis` process: it imports
    the analysis CLI once and runs the grid's analysis commands (every `fit --partial`
    pass and every entry) one after the other, each into its own log; its own
    start-up errors go to `log_path`. Started while jobs train (its imports overlap
    them)."""

    def __init__(self, env: Mapping[str, str], log_path: str):
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        self.log = open(log_path, "ab")
        super().__init__([sys.executable, "-m", "vlm_jax.grid.preload", "--serve",
                          ANALYSIS_MODULE], env, stderr=self.log)

    def submit(self, args: Sequence[str], log_path: str) -> bool:
        """Sends a command; False when the server can no longer take it (it exited)."""
        try:
            self.send({"argv": list(args), "log": log_path})
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def close(self, grace_s: float = 10.0, wait: bool = True) -> None:
        """End of input: it exits; `wait=False` does not wait for its interpreter's exit
        (after the last command nothing needs it: the runner goes on at once)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        if wait:
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def terminate(self) -> None:
        self.proc.terminate()
        self.close()


class _ServerJob:
    """An analysis command the server runs; `died`: the server exited without replying
    (the caller runs the command again as a process of its own)."""

    def __init__(self, server: _AnalysisServer, argv: Sequence[str], log_path: str):
        self.server, self.log_path, self.died = server, log_path, False
        with open(log_path, "ab") as f:
            f.write(f"$ {format_command(argv)}\n".encode())
        self.rc: int | None = None
        if not server.submit(argv[3:], log_path):
            self.died = True

    def _take(self, reply) -> int | None:
        if reply is None:
            self.died = True
            return None
        self.rc = int(reply.get("rc", 1))
        return self.rc

    def poll(self) -> int | None:
        if self.rc is not None or self.died:
            return self.rc
        try:
            return self._take(self.server.replies.get_nowait())
        except queue.Empty:
            return None

    def wait(self) -> int | None:
        if self.rc is not None or self.died:
            return self.rc
        return self._take(self.server.replies.get())

    def terminate(self) -> None:
        self.server.terminate()


class _Analyses:
    """The grid's analysis entries: `start_ready` (while jobs run) starts, one at a time,
    an entry whose stage's runs are all done, else a `fit --partial` pass for a fit entry
    whose groups completed since its last pass, and starts the analysis server
    (`_AnalysisServer`: imports done once, for every pass and entry) as soon as a pass is
    due or an entry's stage has no job left to start, so its start-up overlaps the last
    jobs; `finish` runs the rest once every job has ended and returns the failed
    entries. A command that is not `python -m vlm_jax.analysis` (or whose server died)
    runs as a process of its own."""

    def __init__(self, grid: Grid, root: str, log: Callable[[str], None],
                 env: Mapping[str, str] | None = None):
        self.grid, self.root, self.log = grid, root, log
        self.env = dict(env or {})
        self.todo = list(range(len(grid.analysis)))
        # (entry index, handle, log path, partial: a `fit --partial` pass)
        self.running: tuple | None = None
        self.server: _AnalysisServer | None = None
        self.prefit: dict[int, set] = {}      # fit entry -> groups its partial passes fitted
        self.failed: list[str] = []

    def _stage_runs(self, i: int) -> list[Run]:
        return [r for r in self.grid.runs if r.stage == self.grid.analysis[i].stage]

    def _environ(self) -> dict:
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(
            [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]
            + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        return env

    def _server(self) -> _AnalysisServer:
        """The analysis server, started now if it is not running."""
        if self.server is None or not self.server.alive():
            if self.server is not None:
                self.server.close()
            self.server = _AnalysisServer(
                self._environ(), os.path.join(self.root, "report", "analysis_server.log"))
        return self.server

    def _launch(self, i: int, extra: Sequence[str] = (), own_process: bool = False):
        a = self.grid.analysis[i]
        argv = analysis_argv(a, self.root, [sys.executable]) + list(extra)
        out_dir = os.path.join(self.root, "report", a.out)
        os.makedirs(out_dir, exist_ok=True)
        log_path = os.path.join(out_dir, "analysis.log")
        if not own_process and argv[1:3] == ["-m", ANALYSIS_MODULE]:
            job = _ServerJob(self._server(), argv, log_path)
            if not job.died:
                return job, log_path
        return _ProcJob(argv, self._environ(), log_path), log_path

    def _start(self, i: int) -> None:
        handle, log_path = self._launch(i)
        self.todo.remove(i)
        a = self.grid.analysis[i]
        registry.append_event(self.root, "analysis_start", cmd=a.cmd, stage=a.stage)
        self.running = (i, handle, log_path, False)

    def _complete_groups(self, i: int, state: Mapping[str, str]) -> set:
        """The groups (values of the entry's `--group-cols`, all stage axes) of fit entry
        `i` whose runs are all done; empty when the entry is not such a fit."""
        a = self.grid.analysis[i]
        cols = _group_cols(a.args) if a.cmd == "fit" else []
        if not cols:
            return set()
        groups: dict[tuple, bool] = {}
        for r in self._stage_runs(i):
            axes = dict(r.axes)
            if any(c not in axes for c in cols):
                return set()
            key = tuple(str(axes[c]) for c in cols)
            groups[key] = groups.get(key, True) and state.get(r.name) == "done"
        return {k for k, done in groups.items() if done}

    def _start_partial(self, state: Mapping[str, str]) -> None:
        """Starts `fit --partial` for a fit entry with groups completed since its last
        pass (their fits land in the entry's cache while the other runs train)."""
        for i in self.todo:
            new = self._complete_groups(i, state) - self.prefit.get(i, set())
            if new:
                self.prefit.setdefault(i, set()).update(new)
                handle, log_path = self._launch(i, ["--partial"])
                self.running = (i, handle, log_path, True)
                return

    def _reap(self, wait: bool) -> bool:
        """Collects the running entry (waiting for it if `wait`); True when none runs."""
        if self.running is None:
            return True
        i, handle, log_path, partial = self.running
        rc = handle.wait() if wait else handle.poll()
        if handle.died:   # the server exited without a reply: run it on its own
            extra = ["--partial"] if partial else []
            handle, log_path = self._launch(i, extra, own_process=True)
            self.running = (i, handle, log_path, partial)
            rc = handle.wait() if wait else handle.poll()
        if rc is None:
            return False
        self.running = None
        a = self.grid.analysis[i]
        if partial:   # a cache-filling pass: the entry itself still runs (and reports)
            return True
        registry.append_event(self.root, "analysis_end", cmd=a.cmd, stage=a.stage, rc=rc)
        if rc:
            self.failed.append(f"{a.cmd}:{a.stage}")
            self.log(f"[grid] analysis {a.cmd} {a.stage} FAILED (exit {rc}); log {log_path}:\n"
                     + "\n".join("[grid]   | " + ln
                                 for ln in registry.log_tail(log_path, 8).splitlines()))
        else:
            self.log(f"[grid] analysis {a.cmd} {a.stage}: {os.path.dirname(log_path)}")
        return True

    def start_ready(self, state: Mapping[str, str], pending: Sequence[Job] = ()) -> None:
        """Starts the first entry (not `report`) whose stage's runs are all done, unless
        one is running, else a due partial pass; starts the server once an entry's stage
        has no job left in `pending`."""
        if self._reap(wait=False):
            for i in self.todo:
                runs = self._stage_runs(i)
                if (self.grid.analysis[i].cmd != "report" and runs
                        and all(state.get(r.name) == "done" for r in runs)):
                    self._start(i)
                    break
            else:
                self._start_partial(state)
        if self.server is not None:   # started (a dead one restarts when a command needs it)
            return
        waiting = {r.stage for job in pending for r in job.runs}
        if any(self.grid.analysis[i].cmd != "report" and self._stage_runs(i)
               and self.grid.analysis[i].stage not in waiting for i in self.todo):
            self._server()

    def finish(self, state: Mapping[str, str]) -> list[str]:
        """Waits for the running entry, runs the others in order; the failed entries."""
        self._reap(wait=True)
        for i in list(self.todo):
            a = self.grid.analysis[i]
            stage_runs = self._stage_runs(i)
            done = [r for r in stage_runs if state.get(r.name) == "done"]
            if not done:
                self.log(f"[grid] analysis {a.cmd} {a.stage}: no done runs, not run")
                self.todo.remove(i)
                continue
            if len(done) < len(stage_runs):
                self.log(f"[grid] analysis {a.cmd} {a.stage}: on {len(done)}/"
                         f"{len(stage_runs)} runs")
            self._start(i)
            self._reap(wait=True)
        if self.server is not None:
            self.server.close(wait=False)
            self.server = None
        return self.failed

    def stop(self) -> None:
        """Ctrl-C: terminates the running entry (the next `run` runs it again) and the
        server."""
        if self.running is not None:
            i, handle, _, partial = self.running
            handle.terminate()
            if not partial:
                self.todo.insert(0, i)
            self.running = None
        if self.server is not None:
            self.server.terminate()
            self.server = None


def run_analysis(grid: Grid, root: str, state: Mapping[str, str],
                 log: Callable[[str], None]) -> list[str]:
    """Runs `python -m vlm_jax.analysis CMD ...` for each entry whose stage has done runs
    (in order); returns the failed entries."""
    return _Analyses(grid, root, log).finish(state)


def _failure_lines(root: str, run: Run) -> list[str]:
    """A failed run's error line (the last exception / `error:` line of its log tail) and
    its log path, from the runner's marker: why it failed, not only its exit code."""
    marker = registry.read_json(os.path.join(registry.workdir(root, run), registry.STATUS))
    if not marker:
        return []
    tail = [ln.rstrip() for ln in str(marker.get("log_tail", "")).splitlines() if ln.strip()]
    errs = [ln for ln in tail if not ln[0].isspace() and not ln.startswith("[")
            and ("Error" in ln or "Exception" in ln or ln.lower().startswith("error"))]
    out = [f"           {errs[-1].strip()[:300]}"] if errs else []
    if marker.get("log"):
        out.append(f"           log: {marker['log']}")
    return out


def status_lines(root: str) -> list[str]:
    """`status`: per stage counts, failed/skipped runs with why, and the totals."""
    grid = registry.load_recorded_grid(root)
    lines = [f"grid {grid.name} ({grid.spec}) at {os.path.abspath(root)}"]
    per_stage: dict[str, dict[str, int]] = {}
    problems = []
    totals: dict[str, int] = {}
    for r in grid.runs:
        st, why = registry.run_state(root, r)
        per_stage.setdefault(r.stage, {}).setdefault(st, 0)
        per_stage[r.stage][st] += 1
        totals[st] = totals.get(st, 0) + 1
        if st in ("failed", "skipped"):
            problems.append(f"  {st:8s} {r.name}: {why}")
            if st == "failed":
                problems += _failure_lines(root, r)
    for stage, c in per_stage.items():
        n = sum(c.values())
        lines.append(f"  stage {stage}: {c.get('done', 0)}/{n} done"
                     + "".join(f", {v} {k}" for k, v in sorted(c.items()) if k != "done"))
    lines += problems
    n = len(grid.runs)
    lines.append(f"total: {totals.get('done', 0)}/{n} done"
                 + "".join(f", {v} {k}" for k, v in sorted(totals.items()) if k != "done"))
    return lines
