"""Benchmark: sharding, odapi's streaming `write_shards` vs TF-Vision's write_tf_record_dataset.

Same verified images, same features, same shard count, each writer in its own process with
the machine's cores (odapi: one writer process per core; TF-Vision: its multiprocessing pool
of os.cpu_count()). Reports wall time and the peak resident memory of the whole process tree
(sampled every 10 ms) for N and 4N images: TF-Vision's `pool.starmap` gathers every Example
before writing, so its memory grows with the dataset; odapi's should stay flat.

    .venv/bin/python bench/shards.py [--images 400] [--shards 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent


def _tf_example(path: str, source_id: int, width: int, height: int, boxes: list, label_map: dict):
    import hashlib

    import tensorflow as tf

    def b(v): return tf.train.Feature(bytes_list=tf.train.BytesList(value=v))
    def f(v): return tf.train.Feature(float_list=tf.train.FloatList(value=v))
    def n(v): return tf.train.Feature(int64_list=tf.train.Int64List(value=v))

    data = Path(path).read_bytes()
    feature = {
        "image/encoded": b([data]), "image/format": b([b"jpeg"]),
        "image/filename": b([Path(path).name.encode()]),
        "image/source_id": b([str(source_id).encode()]),
        "image/key/sha256": b([hashlib.sha256(data).hexdigest().encode()]),
        "image/height": n([height]), "image/width": n([width]),
        "image/object/bbox/xmin": f([x["xmin"] for x in boxes]),
        "image/object/bbox/xmax": f([x["xmax"] for x in boxes]),
        "image/object/bbox/ymin": f([x["ymin"] for x in boxes]),
        "image/object/bbox/ymax": f([x["ymax"] for x in boxes]),
        "image/object/class/text": b([x["label"].encode() for x in boxes]),
        "image/object/class/label": n([label_map[x["label"]] for x in boxes]),
        "image/object/area": f([(x["xmax"] - x["xmin"]) * width * (x["ymax"] - x["ymin"]) * height
                                for x in boxes]),
        "image/object/is_crowd": n([0] * len(boxes)),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)), 0


def _run_tf(manifest: Path, out: Path, shards: int) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from official.vision.data import tfrecord_lib

    label_map = {"thing": 1}
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    args = [(r["source"]["uri"], i, r["width"], r["height"], r["boxes"], label_map)
            for i, r in enumerate(rows, start=1)]
    out.mkdir(parents=True)
    start = time.perf_counter()
    tfrecord_lib.write_tf_record_dataset(str(out / "train"), args, _tf_example, shards)
    print(time.perf_counter() - start)


def _run_odapi(manifest: Path, out: Path, shards: int) -> None:
    from odapi_operators.core.data.shard import write_shards

    label_map = out.parent / "label_map.pbtxt"
    start = time.perf_counter()
    write_shards(manifest, label_map, out, {"train": 1.0}, {"train": shards})
    print(time.perf_counter() - start)


def _measure(variant: str, manifest: Path, out: Path, shards: int) -> tuple[float, float, float]:
    """(seconds, seconds without start-up, peak MB of the process tree) of one writer run in a
    child process."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, __file__, "--run", variant, "--manifest",
                              str(manifest), "--out", str(out), "--shards", str(shards)],
                             stdout=subprocess.PIPE, text=True)
    proc, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            tree = [proc] + proc.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.01)
    seconds = time.perf_counter() - start
    if child.returncode:
        raise RuntimeError(f"{variant} writer failed ({child.returncode})")
    return seconds, float(child.stdout.read().split()[-1]), peak / 1e6


def _dataset(root: Path, count: int) -> Path:
    sys.path.insert(0, str(BENCH))
    from download import make_images

    from odapi_operators.core.data.label_map import format_label_map

    make_images(root / "img", count)
    (root / "label_map.pbtxt").write_text(format_label_map({"thing": 1}))
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({
        "key": p.stem, "source": {"kind": "local", "uri": str(p)}, "source_id": p.name,
        "width": 640, "height": 480, "boxes": [{"label": "thing", "xmin": 0.1, "ymin": 0.2,
                                                "xmax": 0.5, "ymax": 0.6}]}) + "\n"
        for p in sorted((root / "img").iterdir())))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--run", choices=("odapi", "tf"), help=argparse.SUPPRESS)
    parser.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        (_run_odapi if args.run == "odapi" else _run_tf)(args.manifest, args.out, args.shards)
        return
    print(f"{os.cpu_count()} cores, {args.shards} shards, 640x480 JPEGs (~47 kB)")
    results = {}
    with tempfile.TemporaryDirectory(prefix="odapi-bench-shards-") as name:
        for count in (args.images, 4 * args.images):
            root = Path(name) / str(count)
            manifest = _dataset(root, count)
            for variant in ("odapi", "tf"):
                results[variant, count] = _measure(variant, manifest, root / variant, args.shards)
            sizes = {v: sum(p.stat().st_size for p in (root / v).glob("*.tfrecord"))
                     for v in ("odapi", "tf")}
            assert sizes["odapi"] == sizes["tf"], sizes  # same Examples, same bytes
            (wall_o, write_o, peak_o) = results["odapi", count]
            (wall_t, write_t, peak_t) = results["tf", count]
            print(f"\n{count} images ({sizes['odapi'] / 1e6:.0f} MB of records)")
            print(f"  odapi write_shards:                {count / write_o:7.0f} images/s "
                  f"(write {write_o:.2f} s, process {wall_o:.2f} s), peak {peak_o:5.0f} MB")
            print(f"  TF-Vision write_tf_record_dataset: {count / write_t:7.0f} images/s "
                  f"(write {write_t:.2f} s, process {wall_t:.2f} s), peak {peak_t:5.0f} MB")
            print(f"  odapi/TF-Vision: {write_t / write_o:.2f}x write speed, "
                  f"{wall_t / wall_o:.2f}x with start-up, {peak_o / peak_t:.2f}x peak memory")
    for variant in ("odapi", "tf"):
        small, large = results[variant, args.images][2], results[variant, 4 * args.images][2]
        print(f"peak memory growth {variant:5} for 4x the images: {large / small:.2f}x "
              f"(+{large - small:.0f} MB)")


if __name__ == "__main__":
    main()
