"""A stand-in for `python -m vlm_jax.main` honouring its workdir contract (tests only):
config.json, metrics.jsonl, result.json (atomic) -- or a crash when config.fail."""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from vlm_jax.grid import worker  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True)
    args, rest = p.parse_known_args()
    path, _, arg = args.config.partition(":")
    overrides = dict(x[len("--config."):].split("=", 1) for x in rest)
    cfg = worker.build_run_config({"config_file": path, "arg": arg, "overrides": overrides})
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f)
    dep = cfg.model.init_from
    if dep and not os.path.exists(os.path.join(dep, "result.json")):
        raise SystemExit(f"init_from {dep} has no result.json")
    with open(os.path.join(args.workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 1, "train/loss": 1.0 / cfg.a, "perf/step_time_s": 0.01})
                + "\n")
    time.sleep(cfg.sleep)
    if cfg.fail:
        print("Traceback (most recent call last):\nRuntimeError: deliberate failure b=bad",
              file=sys.stderr)
        sys.exit(3)
    res = {"status": "done", "steps": 1, "final/train_loss": 1.0 / cfg.a,
           "final/eval_loss": 1.5 / cfg.a, "params/total": 10 * cfg.a, "wall_time_s": 0.1,
           "examples_seen": 8, "tokens_seen": 64, "flops": 1e6}
    tmp = os.path.join(args.workdir, "result.json.tmp")
    with open(tmp, "w") as f:
        json.dump(res, f)
    os.replace(tmp, os.path.join(args.workdir, "result.json"))
    print("fake run done", cfg.name)


if __name__ == "__main__":
    main()
