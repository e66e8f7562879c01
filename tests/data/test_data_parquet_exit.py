"""`python -m vlm_jax.data stats --format parquet` exits 0 after its output (no abort at
interpreter exit).

A native thread of Arrow's pools that asks for the GIL after a read has returned (to free
a buffer that wraps Python bytes, or a Python file object) is ended with pthread_exit if
the interpreter is finalizing by then; its unwinding stops at a noexcept C++ destructor
and calls std::terminate: exit 134, "terminate called without an active exception", after
the output was printed (see `sources._parquet_file`). Plain runs hit that window rarely
(a loaded machine; none in 110 runs on a 2-core VM), so the CLI also runs under an
LD_PRELOAD shim (built here with the C compiler; skipped without one) that logs each GIL
request of a native thread and holds the ones from destructors until the interpreter is
finalizing. With the old reader (a Python file object, `pre_buffer`, threaded decoding)
the second test failed 12 times in 12 (8 of them by the abort itself); the reader now
leaves Arrow's threads no GIL request.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

import vlm_jax
from tests.compiled import subprocess_env
from tests.data.conftest import image_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(vlm_jax.__file__)))
N_ROWS = (8, 5)

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
typedef int (*fn_t)(void);
typedef void *(*ts_t)(void);
/* Each GIL request of a native thread (not a Python thread: no thread state) is logged on
   stderr with its caller; one from a destructor (a release a pool thread was left with)
   waits until the interpreter is finalizing, at most SLOWGIL_HOLD_MS ms. */
static fn_t real, finalizing;
static ts_t this_state;
__attribute__((constructor)) static void init(void) {
  finalizing = (fn_t)dlsym(RTLD_DEFAULT, "Py_IsFinalizing");
  if (!finalizing) finalizing = (fn_t)dlsym(RTLD_DEFAULT, "_Py_IsFinalizing");
  this_state = (ts_t)dlsym(RTLD_DEFAULT, "PyGILState_GetThisThreadState");
  real = (fn_t)dlsym(RTLD_NEXT, "PyGILState_Ensure");
}
int PyGILState_Ensure(void) {
  if (syscall(SYS_gettid) != getpid() && !(this_state && this_state())) {
    Dl_info info;
    const char *name = dladdr(__builtin_return_address(0), &info) && info.dli_sname
                       ? info.dli_sname : "?";
    int dtor = strstr(name, "D0Ev") || strstr(name, "D1Ev") || strstr(name, "D2Ev");
    const char *hold = getenv("SLOWGIL_HOLD_MS");
    int ms = dtor ? (hold ? atoi(hold) : 500) : 0;
    fprintf(stderr, "slowgil: a native thread asks for the GIL from %s\n", name);
    for (int i = 0; i < ms && !(finalizing && finalizing()); i++) usleep(1000);
  }
  return real();
}
"""


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq
    d = tmp_path_factory.mktemp("pq_exit")
    start = 0
    for name, n in zip("ab", N_ROWS):
        idx = range(start, start + n)
        pq.write_table(pa.table({
            "jpg": [image_bytes(colour=(i * 20 % 255, 0, 0)) for i in idx],
            "txt": [f"caption {i}" for i in idx],
            "key": [f"k{i:04d}" for i in idx]}), d / f"{name}.parquet", row_group_size=3)
        start += n
    return d


def _run(args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT,
                          env={**subprocess_env(ROOT), **env}, capture_output=True, text=True,
                          timeout=120)


def _stats(path, **env) -> subprocess.CompletedProcess:
    return _run(["-m", "vlm_jax.data", "stats", "--format", "parquet", "--path", path,
                 "--image-column", "jpg", "--text-column", "txt"], **env)


ASK = "slowgil: a native thread asks for the GIL from "


def _check(p: subprocess.CompletedProcess, what: str) -> None:
    asks = sorted({line[len(ASK):] for line in p.stderr.splitlines() if line.startswith(ASK)})
    assert p.returncode == 0, (f"{what}: exit {p.returncode} (GIL requests of native threads "
                               f"from {asks}); stderr tail:\n{p.stderr[-1500:]}")
    assert "terminate called" not in p.stderr, p.stderr[-1500:]
    assert json.loads(p.stdout)["samples"] == sum(N_ROWS), p.stdout
    assert not asks, f"{what}: Arrow's threads asked for the GIL from {asks}"


def test_stats_parquet_exits_0(parquet_dir):
    for i in range(3):
        _check(_stats(str(parquet_dir / "*.parquet")), f"run {i}")


def test_stats_parquet_leaves_no_gil_request_to_arrow_threads(parquet_dir, tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the LD_PRELOAD shim")
    (tmp_path / "slowgil.c").write_text(SHIM)
    so = tmp_path / "slowgil.so"
    built = subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(so),
                            str(tmp_path / "slowgil.c"), "-ldl"], capture_output=True,
                           text=True)
    if built.returncode != 0:
        pytest.skip(f"the shim does not build: {built.stderr[-500:]}")
    preload = os.pathsep.join([str(so)] + [p for p in [os.environ.get("LD_PRELOAD")] if p])
    # Control: Arrow reading a Python file object (the old way) asks for the GIL from its
    # threads and the shim sees it; else the shim is not in effect here. (Nothing held,
    # and a pause before exit: the control itself must not race the exit.)
    control = _run(["-c", "import sys, time, pyarrow.parquet as pq\n"
                          "with open(sys.argv[1], 'rb') as f:\n"
                          "    pq.ParquetFile(f).read_row_group(0)\n"
                          "time.sleep(0.3)\n",
                    str(parquet_dir / "a.parquet")], LD_PRELOAD=preload,
                   SLOWGIL_HOLD_MS="0")
    if ASK not in control.stderr:
        pytest.skip("the LD_PRELOAD shim sees no GIL request of Arrow's threads here "
                    f"(exit {control.returncode}): {control.stderr[-500:]}")
    for path in (str(parquet_dir / "*.parquet"), f"file://{parquet_dir}/*.parquet"):
        _check(_stats(path, LD_PRELOAD=preload), f"{path} under the shim")
