"""A grid of real, tiny runs for the runner's tests (the real trainer, kind "lm").

Every run of every stage compiles to the same XLA programs (one tiny LM, all params
trainable; the learning rate is a runtime input), so a test session compiles them once and
the persistent compilation cache serves every later run.

Presets:
- `grid`: stage `pre` (axis a = train seed: `seeds`, e.g. "1|2"), stage `main` (a x b, needs `pre/a={a}` as
  `model.llm.init_from`), and with `post=True` a stage `post` (b, needs `main/a=1,b={b}`).
  b=x / b=y train normally (lr 1e-3 / 2e-3); b=bad uses lr=1e30 and trips the trainer's
  non-finite guard at step 2 (`train.max_nonfinite=1`): a run that really diverges.
- `run`: one run (what the grid's runs are). `broken=True` makes get_config raise;
  `main_steps` sets the steps of the main stage (long runs for the Ctrl-C test).
"""
import ml_collections as mlc

from configs import common

_LR = {"x": 1e-3, "y": 2e-3, "bad": 1e30}


def get_config(arg=None):
    a = common.parse_arg(arg, preset="grid", a=1, b="x", values="x|y|bad", seeds="1",
                         steps=3, main_steps=3, post=False, broken=False, break_main=False)
    if a.preset == "grid":
        values = a["values"].split("|")
        seeds = [int(s) for s in a.seeds.split("|")]
        stages = [
            dict(name="pre", arg="run", axes={"a": seeds}),
            dict(name="main", arg=f"run,steps={a.main_steps},broken={a.break_main}",
                 axes={"a": seeds, "b": values}, needs={"model.llm.init_from": "pre/a={a}"}),
        ]
        if a.post:
            stages.append(dict(name="post", arg="run", axes={"a": [1], "b": values},
                               needs={"model.llm.init_from": "main/a={a},b={b}"}))
        c = mlc.ConfigDict()
        c.grid = dict(name="tiny", stages=stages, analysis=[])
        return c
    if a.broken:
        raise ValueError("broken=True: this config does not build")
    if a.b not in _LR:
        raise ValueError(f"b={a.b!r}: valid values are {sorted(_LR)}")
    c = common.base_config()
    c.name = f"tiny_{a.a}_{a.b}"
    c.model.kind = "lm"
    c.model.llm.update(vocab_size=64, max_len=32, bos_id=1, eos_id=2, pad_id=0, width=16,
                       depth=1, heads=2, kv_heads=2, mlp_dim=32, scan_layers=False)
    c.data.update(name="synthetic_clean", tokenizer="synthetic", seq_len=16, n=256, eval_n=8)
    c.train.update(steps=a.steps, batch_size=4, seed=a.a, log_every_steps=1, progress=False,
                   checkpoint_every_secs=3600.0, max_nonfinite=1)
    c.optim.update(lr=_LR[a.b], schedule="constant", warmup_frac=0.0, trainable=("*",))
    return c
