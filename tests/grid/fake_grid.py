"""A grid config for the runner's tests: tiny fake runs (tests/grid/fake_main.py).

Presets: `grid` (stages pre: a in 1,2; main: a x b in x,y,bad with needs on pre),
`run` (one fake run). A run with b=bad (or fail=True) crashes; `sleep` seconds slow it.
"""
import ml_collections as mlc

from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, preset="grid", a=1, b="x", fail=False, sleep=0.0,
                         values="x|y|bad", broken=False, break_main=False)
    if a.preset == "grid":
        c = mlc.ConfigDict()
        c.grid = dict(name="fake", stages=[
            dict(name="pre", arg="run", axes={"a": [1, 2]}),
            dict(name="main", arg=f"run,sleep={a.sleep},broken={a.break_main}", axes={"a": [1, 2],
                                                             "b": a["values"].split("|")},
                 needs={"model.init_from": "pre/a={a}"}),
        ], analysis=[])
        return c
    if a.broken:
        raise ValueError("broken=True: this config does not build")
    c = mlc.ConfigDict()
    c.name = f"fake_{a.a}_{a.b}"
    c.model = mlc.ConfigDict(dict(init_from=""))
    c.a, c.b, c.fail, c.sleep = a.a, a.b, a.fail or a.b == "bad", a.sleep
    return c
