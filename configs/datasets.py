"""Named datasets, selected with `config.data.name` (configs as code).

Each entry overrides fields of `common.data_config()`. A field the run config sets to a
non-default value wins over the named value (so `data.name=cc12m,data.path=...` points
the CC12M recipe at your copy). Paths may use `$VLM_JAX_DATA` (the root where the
img2dataset output lives); with it unset, give `data.path` explicitly.

`INFO` records what the studies used (sizes are of the downloaded sets and only
informative; the pipeline counts what is really there).
"""
from __future__ import annotations

import ml_collections as mlc

DATASETS: dict[str, dict] = {
    # Procedural shapes with true captions: the "clean" side of the data-quality axis.
    "synthetic_clean": dict(source="synthetic", path="", caption_noise=0.0),
    # Same images, 40% of captions wrong or generic: LAION-like web noise.
    "synthetic_noisy": dict(source="synthetic", path="", caption_noise=0.4),
    # img2dataset output: {key}.jpg + {key}.txt (+ .json) in 10k-sample tar shards.
    "cc12m": dict(source="tar", path="$VLM_JAX_DATA/cc12m/{00000..01242}.tar"),
    "laion400m": dict(source="tar", path="$VLM_JAX_DATA/laion400m/{00000..41407}.tar"),
    # TFDS coco_captions (prepare with --file_format=array_record); 5 captions an image,
    # the first is used.
    "coco_captions": dict(source="tfds", path="coco_captions:train",
                          image_column="image", text_column="captions/text"),
    # A Parquet table with downloaded bytes, e.g. LAION metadata + img2dataset parquet output.
    "laion400m_parquet": dict(source="parquet", path="$VLM_JAX_DATA/laion400m_parquet/*.parquet",
                              image_column="jpg", text_column="caption"),
}

INFO = {
    "cc12m": dict(pairs=12_423_374, note="~10-11M downloadable; Changpinyo et al. 2021"),
    "laion400m": dict(pairs=413_000_000, note="Schuhmann et al. 2021; noisier captions"),
    "coco_captions": dict(pairs=118_287 * 5, note="COCO 2017 train images x 5 captions"),
    "synthetic_clean": dict(pairs=10**9, note="procedural, any size"),
    "synthetic_noisy": dict(pairs=10**9, note="procedural, caption_noise=0.4"),
}


def names() -> list[str]:
    return sorted(DATASETS)


def get(name: str) -> dict:
    if name not in DATASETS:
        raise ValueError(f"data.name={name!r} is not a named dataset; known: {names()} "
                         "(or data.name='' to use the data.* fields as they are)")
    return dict(DATASETS[name])


def resolve(data: mlc.ConfigDict) -> mlc.ConfigDict:
    """`data` with its named dataset's fields filled in (explicit non-defaults win)."""
    from configs import common
    out = mlc.ConfigDict(data.to_dict())
    name = data.get("name", "")
    if not name:
        return out
    defaults = common.data_config()
    for k, v in get(name).items():
        if k not in out or k not in defaults or out[k] == defaults[k]:
            out[k] = v
    return out
