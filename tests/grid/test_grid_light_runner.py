"""The runner process stays light: loading, validating and scheduling the demo grid (every
run config built, every job's FLOP estimate) imports neither JAX nor Grain nor flax, so it
does not compete for the cores with the workers that import them (issue 6)."""
import json
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
