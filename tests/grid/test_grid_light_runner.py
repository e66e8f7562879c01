"""The runner process stays light (issue 6): loading, validating and scheduling the demo grid
(every run config built, every job's FLOP estimate) imports neither JAX nor Grain nor flax,
so it does not compete for the cores with the workers that import them; its results.csv
rewrites read only the runs not done yet."""
import json
import os
import subprocess

from tests.grid.conftest import PY, REPO, cli_env

CODE = """
import json, sys
from vlm_jax.grid import expand, runner
from vlm_jax.grid.launchers import make_jobs
g = expand.load_grid("configs/demo.py")
errors = expand.validate_runs(g)
costs = runner.job_costs(make_jobs(g.runs))
print(json.dumps({"errors": errors, "runs": len(g.runs),
                  "costs": sorted(costs.values()),
                  "heavy": sorted(m for m in ("jax", "grain", "flax", "PIL", "optax")
                                  if m in sys.modules)}))
"""


def test_validation_and_schedule_import_no_jax():
    p = subprocess.run([PY, "-c", CODE], cwd=REPO, env=cli_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["errors"] == [] and out["runs"] > 40
    assert out["heavy"] == [], out["heavy"]
    assert all(c > 0 for c in out["costs"])   # every job's estimate computed, none failed


def test_results_csv_rewrites_read_only_the_runs_not_done(tmp_path):
    """The runner rewrites results.csv after every job; rows of done runs are kept
    (`done_rows`), the others are read again, and the table equals a fresh one."""
    import csv

    from tests.grid.conftest import TINY_GRID
    from vlm_jax.grid import expand, registry
    root = str(tmp_path)
    g = expand.load_grid(TINY_GRID + ":grid,values=x|y")
    a, b = g.runs[0], g.runs[1]

    def done(run, loss):
        registry.atomic_write_json(os.path.join(root, run.workdir, "result.json"),
                                   {"status": "done", "final/eval_loss": loss, "steps": 3})

    def table(cache=None):
        with open(registry.write_results_csv(root, g, cache)) as f:
            return {r["run"]: r for r in csv.DictReader(f)}
    done(a, 1.5)
    cache = {}
    first = table(cache)
    assert set(cache) == {a.name} and first[b.name]["status"] == "pending"
    done(b, 2.5)
    assert table(cache) == table()                      # b read again: equal to a fresh table
    assert table(cache)[b.name]["eval_loss"] == "2.5" and set(cache) == {a.name, b.name}
    done(a, 9.0)                                        # a done run's files are not re-read
    assert table(cache)[a.name]["eval_loss"] == "1.5" and table()[a.name]["eval_loss"] == "9.0"
