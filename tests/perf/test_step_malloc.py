"""The allocator setting of benchmarks/step.py and the local launcher (`vlm_jax.malloc`):
`reexec` re-executes the program once with GLIBC_TUNABLES, and under those settings a freed large block stays mapped
(the next allocation of that size faults in no fresh pages), which is what spares the train
step its per-step page faults."""
import os
import subprocess
import sys

import pytest

from vlm_jax import malloc

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CHILD = r"""
import os, resource, sys
sys.path.insert(0, sys.argv[1])
from vlm_jax import malloc
malloc.reexec(sys.argv)
import numpy as np
np._core.multiarray._set_madvise_hugepage(False)   # 4 KiB pages: one fault per page

def faults_of_alloc():
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.empty(64 << 20, np.uint8)   # 64 MiB: above glibc's largest mmap threshold
    a[::4096] = 1                      # touch every page
    n = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
    del a
    return n

first, second = faults_of_alloc(), faults_of_alloc()
print(os.environ.get("GLIBC_TUNABLES"), first, second)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables")
def test_reexec_sets_tunables_and_freed_blocks_stay_mapped(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, str(script), _ROOT], env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout.split()
    tunables, first, second = out[0], int(out[1]), int(out[2])
    assert tunables == malloc.TUNABLES          # re-executed once, with the setting
    assert first > 8000                              # the first 64 MiB faulted in
    assert second < first // 10, (first, second)     # the second reused the freed block

    # An environment that already sets GLIBC_TUNABLES is left alone (no re-exec).
    env["GLIBC_TUNABLES"] = "glibc.malloc.arena_max=2"
    out = subprocess.run([sys.executable, str(script), _ROOT], env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout.split()
    assert out[0] == "glibc.malloc.arena_max=2"
