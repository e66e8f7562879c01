"""Data CLI.

    python -m vlm_jax.data stats --format {tar,arrayrecord,parquet,tfds,synthetic} \\
        --path PATTERN [--limit N] [--image-column C --text-column C]
    python -m vlm_jax.data convert --from tar --path PATTERN --to arrayrecord --out DIR \\
        [--records-per-file N] [--force]

`stats` reads the samples in order, decodes every image and caption, and prints one JSON
object: `samples` (usable), `skipped` (reason -> count), `records`, `seconds`,
`samples_per_sec`, `shard_errors`. `convert` writes the usable samples to ArrayRecord
files (`part-00000.array_record`, ...) plus `stats.json`, each written to a temporary
name and renamed when complete; an --out that already holds ArrayRecord files is refused
unless `--force` (then the earlier conversion's files are replaced).
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import time
from typing import Callable, Iterator

from vlm_jax.data import sources as S
from vlm_jax.data import transforms as T
from vlm_jax.data.errors import BadSample

log = logging.getLogger("vlm_jax.data")


def _open(fmt: str, path: str, args) -> object:
    return S.open_source(fmt, path, seed=0, image_column=args.image_column,
                         text_column=args.text_column, shuffle_shards=False)


class Scanner:
    """Iterates a source in order, checks each sample, counts bad ones by reason."""

    def __init__(self, source, limit: int | None, check: Callable[[dict], dict]):
        self.source, self.limit, self.check = source, limit, check
        self.skipped: collections.Counter = collections.Counter()
        self.records = 0

    def __iter__(self) -> Iterator[dict]:
        for i, sample in S.iter_records(self.source, self.limit):
            self.records += 1
            try:
                if isinstance(sample, BadSample):
                    raise sample
                yield self.check(sample)
            except BadSample as e:
                self.skipped[e.reason] += 1
                log.info("skip record %d: %s", i, e)
        for path, err in getattr(self.source, "errors", ()):
            reason = "unreadable_shard" if err.startswith("unreadable") else "truncated_shard"
            self.skipped[reason] += 1  # (the source logged it)


def _decode_check(sample: dict) -> dict:
    T.decode_image(sample.get("image"))
    return {**sample, "text": T.caption_text(sample.get("text"))}


def _cheap_check(sample: dict) -> dict:
    """Caption valid, image present and its header readable (no full decode)."""
    image = sample.get("image")
    if image is None:
        raise BadSample("missing_image")
    if isinstance(image, (bytes, bytearray)):
        if not image:
            raise BadSample("empty_image")
        import io
        from PIL import Image
        try:
            Image.open(io.BytesIO(image)).verify()
        except Exception as e:  # noqa: BLE001
            raise BadSample("decode_error", f"{type(e).__name__}: {e}") from None
    return {**sample, "text": T.caption_text(sample.get("text"))}


def cmd_stats(args) -> dict:
    src = _open(args.format, args.path, args)
    limit = args.limit if args.limit else (1000 if args.format == "synthetic" else None)
    scanner = Scanner(src, limit, _decode_check)
    t0 = time.perf_counter()
    samples = sum(1 for _ in scanner)
    dt = time.perf_counter() - t0
    return {"format": args.format, "path": args.path, "samples": samples,
            "skipped": dict(sorted(scanner.skipped.items())), "records": scanner.records,
            "seconds": round(dt, 4), "samples_per_sec": round(samples / max(dt, 1e-9), 2),
            "shard_errors": [f"{p}: {e}" for p, e in getattr(src, "errors", ())]}


def cmd_convert(args) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter
    if args.to != "arrayrecord":
        raise SystemExit(f"--to {args.to!r}: only 'arrayrecord' is supported")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} is a file, not a directory")
    os.makedirs(args.out, exist_ok=True)
    old = sorted(f for f in os.listdir(args.out) if f.endswith(".array_record"))
    if old and not args.force:
        raise ValueError(f"--out {args.out!r} already holds {len(old)} ArrayRecord file(s) "
                         f"({old[0]}, ...): pass --force to replace them, or use a new --out "
                         f"(files of two conversions would be read as one data set)")
    src = _open(args.from_, args.path, args)
    scanner = Scanner(src, args.limit or None, _cheap_check)
    files, written, writer, tmp = [], 0, None, ""
    t0 = time.perf_counter()

    def close():
        nonlocal writer
        if writer is not None:
            writer.close()
            final = os.path.join(args.out, f"part-{len(files):05d}.array_record")
            os.replace(tmp, final)
            files.append(os.path.basename(final))
            writer = None

    try:
        for sample in scanner:
            if writer is None:
                tmp = os.path.join(args.out, f".part-{len(files):05d}.array_record.tmp")
                writer = ArrayRecordWriter(tmp, "group_size:1")
            writer.write(S.encode_record(sample))
            written += 1
            if written % args.records_per_file == 0:
                close()
        close()
    finally:
        if writer is not None:  # failed mid-file: drop the partial file
            writer.close()
            os.remove(tmp)
    stats = {"from": args.from_, "path": args.path, "out": args.out, "samples": written,
             "skipped": dict(sorted(scanner.skipped.items())), "records": scanner.records,
             "files": files, "seconds": round(time.perf_counter() - t0, 3)}
    for f in set(old) - set(files):   # --force: the earlier conversion's leftover parts
        os.remove(os.path.join(args.out, f))
    tmp_stats = os.path.join(args.out, ".stats.json.tmp")
    with open(tmp_stats, "w") as f:
        json.dump(stats, f, indent=1)
    os.replace(tmp_stats, os.path.join(args.out, "stats.json"))
    return stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlm_jax.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("stats", "convert"):
        q = sub.add_parser(name)
        if name == "stats":
            q.add_argument("--format", required=True, choices=S.FORMATS)
        else:
            q.add_argument("--from", dest="from_", required=True, choices=S.FORMATS)
            q.add_argument("--to", default="arrayrecord", choices=["arrayrecord"])
            q.add_argument("--out", required=True)
            q.add_argument("--records-per-file", type=int, default=10000)
            q.add_argument("--force", action="store_true",
                           help="replace the ArrayRecord files already in --out")
        q.add_argument("--path", default="")
        q.add_argument("--limit", type=int, default=0)
        q.add_argument("--image-column", default="image")
        q.add_argument("--text-column", default="caption")
        q.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.limit < 0:
        p.error(f"--limit {args.limit}: give 0 (all records) or a positive count")
    if args.cmd == "convert" and args.records_per_file < 1:
        p.error(f"--records-per-file {args.records_per_file}: give at least 1")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        out = cmd_stats(args) if args.cmd == "stats" else cmd_convert(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
