"""`python -m vlm_jax.grid run|status|plan`: study grids (docs/grid.md).

    python -m vlm_jax.grid run configs/demo.py --root runs/demo [--parallel 2]
        [--launcher local|gpu|tpu|xpk] [--dry-run] [--select AXIS=V1,V2 ...]
    python -m vlm_jax.grid status --root runs/demo
    python -m vlm_jax.grid plan ...            # compute planning (vlm_jax.grid.plan)
"""
from __future__ import annotations

import argparse
import os
import sys

from vlm_jax.grid import expand, registry, runner
from vlm_jax.grid.launchers import LAUNCHERS, CloudOptions, make_launcher


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def _run_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="run (or resume) every run of a grid",
                       description="Expands CONFIG's grid and runs what is not done yet.")
    p.add_argument("config", help="FILE.py[:ARG] whose get_config(ARG or 'grid') has a grid")
    p.add_argument("--root", required=True, help="directory of the grid's runs and results")
    p.add_argument("--launcher", default="local", choices=LAUNCHERS)
    p.add_argument("--parallel", type=int, default=1, help="jobs at a time (default 1)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the exact commands, run nothing")
    p.add_argument("--select", action="append", default=[], metavar="AXIS=V1,V2",
                   help="keep only these values of an axis (repeatable); runs they need stay")
    p.add_argument("--executor", default="", choices=["", "worker", "process"],
                   help="local/gpu: persistent in-process workers (local default) or one "
                        "process per run (gpu default)")
    p.add_argument("--no-retry-failed", action="store_true",
                   help="leave runs that failed before alone (default: retry, resuming)")
    p.add_argument("--no-analysis", action="store_true", help="skip the analysis entries")
    p.add_argument("--allow-grid-change", action="store_true",
                   help="run on a root whose grid was defined differently (e.g. another "
                        "axis order): record the new definition, keep the done runs")
    p.add_argument("--no-validate", action="store_true",
                   help="do not build every run's config before launching")
    g = p.add_argument_group("gpu")
    g.add_argument("--gpus-per-run", type=int, default=int(_env("GPUS_PER_RUN", "0") or 0),
                   help="CUDA_VISIBLE_DEVICES per parallel slot (0 = all GPUs)")
    g.add_argument("--install-cuda", action="store_true",
                   help="pip install jax[cuda12] into this Python first")
    c = p.add_argument_group("tpu / xpk (defaults from the environment, see launch/*.sh)")
    c.add_argument("--project", default=_env("PROJECT"))
    c.add_argument("--zone", default=_env("ZONE"))
    c.add_argument("--remote-root", default=_env("REMOTE_ROOT"),
                   help="gs://bucket/path for workdirs (every host reads/writes there)")
    c.add_argument("--tpu-name", default=_env("TPU_NAME"))
    c.add_argument("--accelerator", default=_env("ACCELERATOR", "v5p-8"),
                   help="TPU type, e.g. v5p-64, v6e-256")
    c.add_argument("--tpu-version", default=_env("TPU_VERSION", "tpu-ubuntu2204-base"))
    c.add_argument("--num-slices", type=int, default=int(_env("NUM_SLICES", "1") or 1))
    c.add_argument("--spot", action="store_true", default=_env("SPOT") == "1")
    c.add_argument("--create", action="store_true", default=_env("CREATE") == "1",
                   help="create the TPU VM (or queued resource for multi-slice) first")
    c.add_argument("--coordinator", default=_env("COORDINATOR"),
                   help="multi-slice: address of slice 0 worker 0 (default: looked up)")
    c.add_argument("--cluster", default=_env("CLUSTER"))
    c.add_argument("--docker-image", default=_env("DOCKER_IMAGE"))
    c.add_argument("--base-docker-image", default=_env("BASE_DOCKER_IMAGE",
                                                       "python:3.11-slim"))
    c.add_argument("--workload-prefix", default=_env("WORKLOAD_PREFIX", "vlmjax"))
    return p


def _check_root_path(root: str) -> None:
    if os.path.exists(root) and not os.path.isdir(root):
        raise expand.GridError(f"--root {root} is a file, not a directory")


def cmd_run(args) -> int:
    launcher = None
    try:
        _check_root_path(args.root)
        if args.gpus_per_run < 0:
            raise expand.GridError(f"--gpus-per-run {args.gpus_per_run}: give 0 (every GPU "
                                   "for each run) or a positive count")
        if args.num_slices < 1:
            raise expand.GridError(f"--num-slices {args.num_slices}: give 1 or more")
        select = expand.parse_selection(args.select)
        opts = CloudOptions(
            project=args.project, zone=args.zone, remote_root=args.remote_root,
            tpu_name=args.tpu_name, accelerator=args.accelerator,
            tpu_version=args.tpu_version, num_slices=args.num_slices, spot=args.spot,
            create=args.create, coordinator=args.coordinator, cluster=args.cluster,
            docker_image=args.docker_image, base_docker_image=args.base_docker_image,
            workload_prefix=args.workload_prefix)
        launcher = make_launcher(args.launcher, args.root, args.parallel,
                                 executor=args.executor, gpus_per_run=args.gpus_per_run,
                                 install_cuda=args.install_cuda, opts=opts)
        if not args.dry_run:
            # the local workers import JAX and the trainer while this process loads, builds
            # and plans the grid (their start-up overlaps ours instead of following it)
            launcher.prestart()
        grid = expand.load_grid(args.config, select=select)
        if not args.no_validate:
            errors = expand.validate_runs(grid)
            if errors:
                print(f"[grid] {len(errors)} run config(s) fail to build; nothing launched:",
                      file=sys.stderr)
                for e in errors[:20]:
                    print("  " + e, file=sys.stderr)
                return 2
        if args.dry_run:
            registry.check_root(os.path.abspath(args.root), grid,
                                allow_change=args.allow_grid_change)
            runner.dry_run(grid, args.root, launcher)
            return 0
        summary = runner.run_grid(grid, args.root, launcher,
                                  retry_failed=not args.no_retry_failed,
                                  analysis=not args.no_analysis,
                                  allow_grid_change=args.allow_grid_change)
    except expand.GridError as e:
        print(f"[grid] error: {e}", file=sys.stderr)
        return 2
    finally:
        if launcher is not None:
            launcher.close()   # idempotent; stops prestarted workers when nothing ran
    if summary.interrupted:
        return 130
    return 0 if summary.ok else 1


def cmd_status(args) -> int:
    try:
        _check_root_path(args.root)
        for line in runner.status_lines(args.root):
            print(line)
    except expand.GridError as e:
        print(f"[grid] error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plan":  # helper module with its own CLI
        from vlm_jax.grid import plan
        return plan.main(argv[1:]) or 0
    p = argparse.ArgumentParser(prog="python -m vlm_jax.grid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    _run_parser(sub)
    st = sub.add_parser("status", help="what is done, failed, skipped, left")
    st.add_argument("--root", required=True)
    sub.add_parser("plan", help="compute plan of a grid (python -m vlm_jax.grid plan -h)")
    args = p.parse_args(argv)
    return cmd_run(args) if args.cmd == "run" else cmd_status(args)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:   # `--dry-run | head`: the reader stopped early, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
