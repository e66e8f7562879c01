"""Sharded training on 8 virtual CPU devices equals training on 1 device."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.compiled import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# One subprocess run (multi-minute on a loaded machine) checked by four subtests, in one test
# function: under pytest-xdist a module fixture shared by several tests runs again in every
# worker that gets one of them (xdist_group does not group with pytest 9 + xdist 3.8).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def _run_worker(workdir):
    env = subprocess_env(ROOT, devices=8)
    p = subprocess.run([sys.executable, "-m", "tests.train.sharding_worker", str(workdir)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_sharded_training_on_8_devices(tmp_path, subtests):
    result = _run_worker(tmp_path)
    for check in (meshes_match_one_device, params_and_optimizer_state_are_sharded,
                  bad_mesh_and_batch_are_clear_errors, restore_onto_another_mesh):
        with subtests.test(check.__name__):
            check(result)


def meshes_match_one_device(result):
    ref = result["meshes"]["(1, 1, 1)"]
    for mesh, r in result["meshes"].items():
        np.testing.assert_allclose(r["losses"], ref["losses"], rtol=2e-5, err_msg=mesh)
        np.testing.assert_allclose(np.asarray(r["params"][0]), np.asarray(ref["params"][0]),
                                   rtol=1e-4, atol=1e-6, err_msg=mesh)
    assert ref["losses"][-1] < ref["losses"][0]  # it trains


def params_and_optimizer_state_are_sharded(result):
    m = result["meshes"]
    # lm_head kernel [vocab, embed] (torch layout): vocab over tensor, embed over fsdp;
    # Adam's mu alike
    assert m["(1, 4, 2)"]["head_spec"] == ["tensor", "fsdp"]
    assert m["(1, 4, 2)"]["mu_spec"] == m["(1, 4, 2)"]["head_spec"]
    assert m["(1, 4, 2)"]["head_shards"] == 8
    assert m["(2, 2, 2)"]["q_spec"] == ["tensor", None, "fsdp"]   # [heads, kv, embed]
    assert m["(8, 1, 1)"]["head_spec"] == [None, None]  # pure data parallel: replicated


def bad_mesh_and_batch_are_clear_errors(result):
    e = result["errors"]
    assert "train.batch_size=4" in e["batch"] and "data-parallel size 8" in e["batch"]
    assert "mesh.shape" in e["mesh"] and "16 devices" in e["mesh"]


def restore_onto_another_mesh(result):
    """A checkpoint written on (2,2,2) after step 1, restored onto (1,4,2) (train state and
    data iterator), continues with the losses of steps 2 and 3."""
    m = result["meshes"]
    np.testing.assert_allclose(m["(1, 4, 2)"]["restored_losses"], m["(2, 2, 2)"]["losses"][1:],
                               rtol=2e-5)
