"""Runs in a subprocess with 8 virtual CPU devices (XLA_FLAGS set by the test).

Prints one JSON line: losses per mesh, checks of the param/optimizer shardings, the
bad-input errors, and a checkpoint written on (2,2,2) restored onto (1,4,2).
"""
from __future__ import annotations

import json
import sys

import jax
import numpy as np

from tests.train import tiny
from vlm_jax.train import checkpoint as ckpt
from vlm_jax.train import sharding, trainer

MESHES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2)]
SAVE_ON, RESTORE_ON = (2, 2, 2), (1, 4, 2)


def steps_on(shape, root, n=3):
    c = tiny.config()
    c.optim.trainable = ("",)          # everything trains: sharded optimizer state too
    c.optim.flatten = "off"            # per-leaf optimizer state on every mesh (checked)
    c.mesh.shape = shape
    devs = jax.devices()[:int(np.prod(shape))]
    r = trainer.Run(c, "/nonexistent", model=tiny.TinyVLM(), batch_spec=tiny.batch_spec,
                    data=tiny.Data(), devices=devs)
    tr, fr = r.init_params()
    state = r.init_state(tr)
    r.compile(state, fr, with_eval=False)
    it = r.data.train_iterator(c)
    losses = []
    for i in range(n):
        state, m = r.train_step(state, fr, sharding.global_batch(next(it), r.mesh))
        losses.append(float(m["loss"]))
        if i == 0 and shape == SAVE_ON:  # checkpoint after step 1 (params, Adam, data)
            mgr = ckpt.make_manager(root, async_save=False)
            ckpt.save(mgr, 1, state, it, {"examples_seen": 8})
            mgr.close()
    head = state["params"]["llm"]["lm_head"]["kernel"]
    mu = state["opt_state"][1][0].mu["llm"]["lm_head"]["kernel"]
    q = state["params"]["llm"]["q"]["kernel"]
    spec = lambda x: [a if a is None or isinstance(a, str) else list(a) for a in x.sharding.spec]
    out = dict(losses=losses, head_spec=spec(head), mu_spec=spec(mu), q_spec=spec(q),
               head_shards=len({tuple((s.start, s.stop) for s in sh.index)
                                for sh in head.addressable_shards}),
               params=[np.asarray(x).tolist() for x in
                       jax.tree.leaves(jax.device_get(state["params"]))][:2])
    if shape == RESTORE_ON:  # the (2,2,2) checkpoint restored onto this mesh
        mgr = ckpt.make_manager(root, read_only=True)
        it = r.data.train_iterator(c)
        state, meta = ckpt.restore(mgr, 1, state, it)
        mgr.close()
        assert meta == {"examples_seen": 8}, meta
        assert state["params"]["llm"]["lm_head"]["kernel"].sharding.spec == head.sharding.spec
        out["restored_losses"] = []
        for _ in range(n - 1):
            state, m = r.train_step(state, fr, sharding.global_batch(next(it), r.mesh))
            out["restored_losses"].append(float(m["loss"]))
    return out


def errors():
    out = {}
    c = tiny.config()
    c.mesh.shape = (8, 1, 1)
    c.train.batch_size = 4
    try:
        trainer.Run(c, "/nonexistent", model=tiny.TinyVLM(), batch_spec=tiny.batch_spec)
    except ValueError as e:
        out["batch"] = str(e)
    c = tiny.config()
    c.mesh.shape = (4, 4, 1)
    try:
        trainer.Run(c, "/nonexistent", model=tiny.TinyVLM(), batch_spec=tiny.batch_spec)
    except ValueError as e:
        out["mesh"] = str(e)
    return out


def main():
    assert len(jax.devices()) == 8, jax.devices()
    out = {"meshes": {str(s): steps_on(s, sys.argv[1]) for s in MESHES}, "errors": errors()}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
