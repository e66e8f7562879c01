"""Real data files for the data tests: img2dataset tar shards with corrupt members,
Parquet tables, images in every awkward mode."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image


def image_bytes(size=(40, 30), colour=(200, 30, 30), fmt="JPEG", mode="RGB", **save) -> bytes:
    w, h = size
    img = Image.new("RGB", (w, h), colour)
    # A left/right split makes orientation and cropping visible.
    arr = np.asarray(img).copy()
    arr[:, : w // 2] = (10, 200, 10)
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shard(path, samples) -> None:
    """samples: list of (key, {ext: bytes})."""
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                add_member(tf, f"{key}.{ext}", data)


def good(key: str, i: int, fmt="jpg", **kw) -> tuple[str, dict]:
    pil = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    return key, {fmt: image_bytes(colour=(10 * i % 255, 100, 50), fmt=pil, **kw),
                 "txt": f"a photo number {i}".encode(),
                 "json": json.dumps({"key": key, "status": "success"}).encode()}


@pytest.fixture
def shards(tmp_path):
    """Three good shards + one with every kind of bad member + a truncated and a garbage
    shard. Returns (pattern, expected) with exact counts."""
    d = tmp_path / "shards"
    d.mkdir()
    k = 0
    for s in range(3):
        samples = []
        for _ in range(10):
            samples.append(good(f"{k:09d}", k, fmt=("jpg", "png", "webp", "jpeg")[k % 4]))
            k += 1
        write_shard(d / f"{s:05d}.tar", samples)
    jpg = image_bytes()
    bad = [
        good(f"{k:09d}", k),                                              # fine
        (f"{k + 1:09d}", {"jpg": b"not an image at all", "txt": b"junk"}),  # decode_error
        (f"{k + 2:09d}", {"jpg": jpg[: len(jpg) // 2], "txt": b"half"}),    # decode_error
        (f"{k + 3:09d}", {"jpg": b"", "txt": b"zero bytes"}),               # empty_image
        (f"{k + 4:09d}", {"jpg": jpg}),                                     # missing_caption
        (f"{k + 5:09d}", {"txt": b"no image here"}),                        # missing_image
        (f"{k + 6:09d}", {"jpg": jpg, "txt": b"   \n"}),                    # empty_caption
        (f"{k + 7:09d}", {"jpg": jpg, "txt": b"\xff\xfe caf\xe9"}),         # bad_utf8
        ("../../etc/evil", {"jpg": jpg, "txt": b"a key, never a path"}),    # fine
        (f"{k + 9:09d}", {"gif": jpg, "txt": b"wrong extension"}),          # missing_image
    ]
    write_shard(d / "00003.tar", bad)
    # Truncated: 4 samples, the file cut inside the last image.
    tr = d / "00004.tar"
    write_shard(tr, [good(f"t{i:08d}", i) for i in range(4)])
    raw = tr.read_bytes()
    last = raw.rfind(b"t00000003.jpg")
    tr.write_bytes(raw[: last + 512 + 200])
    (d / "00005.tar").write_bytes(b"\x00garbage" * 300)
    expected = {
        "samples": 30 + 2 + 3,
        "skipped": {"decode_error": 2, "empty_image": 1, "missing_caption": 1,
                    "missing_image": 2, "empty_caption": 1, "bad_utf8": 1,
                    "truncated_member": 1, "truncated_shard": 1, "unreadable_shard": 1},
        "records": 30 + 10 + 4,
    }
    return str(d / "{00000..00005}.tar"), expected
