"""Benchmark: `odapi ingest` of a generated Open Images export at full scale, in bounded memory.

Generates (streaming, cached under --cache so a re-run does not regenerate) an Open Images
export with realistic column values: 16-hex ImageIDs, xclick/activemil sources, 600 MIDs
used with a Zipf-like skew, 6-decimal coordinates, IsOccluded/IsTruncated/IsDepiction/IsInside
flags, one group box (IsGroupOf=1) in 5% of the images, a Flickr-like image index with
OriginalMD5 and Rotation. Both the boxes CSV and the index are unsorted (each image's rows
are scattered over a window of 50k images), the case that used to hold every box in memory.

Each ingest runs in a fresh child process (its peak RSS is VmHWM of /proc/self/status: the
child's own, where `ru_maxrss` may carry the parent's from before exec). Printed:
- at --boxes (default 15M boxes / 1.7M images): boxes/s and the peak RSS (goal: <= 1 GB);
- at --small-boxes (default 200k): boxes/s of this tree and of the in-memory ingest of
  --baseline-ref (extracted with `git archive`), median of --repeat interleaved runs each, and
  the ratio (goal: >= 0.8), per wall second and per CPU second (on a shared machine the wall
  clock mostly measures the neighbours).

    .venv/bin/python bench/ingest_openimages.py [--boxes 15000000 --images 1700000]
        [--small-boxes 200000] [--repeat 3] [--baseline-ref c279d81] [--cache /tmp/...]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOXES_HEADER = ("ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,"
                "IsTruncated,IsGroupOf,IsDepiction,IsInside")
INDEX_HEADER = ("ImageID,Subset,OriginalURL,OriginalLandingURL,License,AuthorProfileURL,"
                "Author,Title,OriginalSize,OriginalMD5,Thumbnail300KURL,Rotation")
LICENSES = ("https://creativecommons.org/licenses/by/2.0/",
            "https://creativecommons.org/licenses/by-sa/2.0/")
WINDOW = 50_000  # images whose rows are shuffled together
GROUP_SHARE = 0.05  # images with one group box
# the in-memory ingest, last commit before the external merge (#17)
BASELINE_REF = "c279d81"

CHILD = r"""
import json, resource, sys, time
from odapi_operators.core.data.ingest import ingest
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
start, start_cpu = time.perf_counter(), cpu()
summary = ingest([sys.argv[1]], sys.argv[2])
seconds = time.perf_counter() - start
with open("/proc/self/status") as fh:
    peak_kb = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "cpu": cpu() - start_cpu, "images": summary["images"],
                  "boxes": summary["boxes"],
                  "fingerprint": summary["fingerprint"],
                  "peak_rss_mb": peak_kb / 1024}))
"""


def _mids(rng: random.Random) -> list[str]:
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz_"
    return [f"/m/0{''.join(rng.choice(alphabet) for _ in range(rng.choice((4, 5))))}{i:x}"
            for i in range(600)]


def _counts(rng: random.Random, images: int, boxes: int) -> list[int]:
    """Boxes per image, at least one each, summing to `boxes`, varied pairwise."""
    share, extra = divmod(boxes, images)
    counts = [share + (i < extra) for i in range(images)]
    for i in range(0, images - 1, 2):
        move = rng.randint(0, counts[i + 1] - 1) - rng.randint(0, counts[i] - 1)
        counts[i] += move
        counts[i + 1] -= move
    return counts


def write_export(folder: Path, images: int, boxes: int) -> dict:
    """Write the export to `folder` (through a temporary sibling) and return its counts."""
    rng = random.Random(17)
    mids = _mids(rng)
    weights = [1 / (rank + 1) for rank in range(len(mids))]
    counts = _counts(rng, images, boxes)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    with open(tmp / "class-descriptions-boxable.csv", "w") as fh:
        fh.writelines(f"{mid},Object {i}\n" for i, mid in enumerate(mids))
    kept_images = kept_boxes = 0
    with open(tmp / "train-annotations-bbox.csv", "w") as boxes_fh, \
            open(tmp / "train-images-boxable-with-rotation.csv", "w") as index_fh:
        boxes_fh.write(BOXES_HEADER + "\n")
        index_fh.write(INDEX_HEADER + "\n")
        for first in range(0, images, WINDOW):
            rows = []
            for i in range(first, min(first + WINDOW, images)):
                image_id = hashlib.sha1(i.to_bytes(8, "big")).hexdigest()[:16]
                group = rng.random() < GROUP_SHARE
                labels = rng.choices(mids, weights, k=counts[i])
                for number, mid in enumerate(labels):
                    x0, y0 = rng.random() * 0.9, rng.random() * 0.9
                    # at least 0.001 wide and high: never degenerate once written with 6 digits
                    x1 = min(1.0, x0 + 0.001 + rng.random() * 0.5)
                    y1 = min(1.0, y0 + 0.001 + rng.random() * 0.5)
                    source = "xclick" if rng.random() < 0.8 else "activemil"
                    flags = ("-1" if source == "activemil" else str(rng.randint(0, 1)),
                             str(rng.randint(0, 1)), "1" if group and number == 0 else "0",
                             str(int(rng.random() < 0.05)), str(int(rng.random() < 0.02)))
                    rows.append(f"{image_id},{source},{mid},1,{x0:.6f},{x1:.6f},{y0:.6f},"
                                f"{y1:.6f},{','.join(flags)}\n")
                kept_boxes += counts[i] - group
                kept_images += counts[i] > group
                farm, server = rng.randint(1, 9), rng.randint(1000, 9999)
                photo, secret = rng.randint(10**9, 10**10), f"{rng.getrandbits(40):010x}"
                user = f"{rng.randint(10**7, 10**8)}@N0{rng.randint(0, 8)}"
                md5 = base64.b64encode(hashlib.md5(image_id.encode()).digest()).decode()
                index_fh.write(
                    f"{image_id},train,https://farm{farm}.staticflickr.com/{server}/{photo}_"
                    f"{secret}_o.jpg,https://www.flickr.com/photos/{user}/{photo},"
                    f"{rng.choice(LICENSES)},https://www.flickr.com/people/{user}/,"
                    f"Photographer {user[:5]},\"Photo {photo}, taken\","
                    f"{rng.randint(10**5, 10**7)},{md5},https://c{farm}.staticflickr.com/"
                    f"{farm}/{server}/{photo}_{secret}_z.jpg,"
                    f"{rng.choice(('0', '0', '0', '90', '180', '270', ''))}\n")
            rng.shuffle(rows)
            boxes_fh.writelines(rows)
    meta = {"images": images, "boxes": boxes, "kept_images": kept_images,
            "kept_boxes": kept_boxes,
            "boxes_csv_mb": round((tmp / "train-annotations-bbox.csv").stat().st_size / 1e6)}
    (tmp / "meta.json").write_text(json.dumps(meta))
    os.rename(tmp, folder)
    return meta


def cached_export(cache: Path, images: int, boxes: int) -> tuple[Path, dict]:
    folder = cache / f"openimages-v2-{images}-{boxes}"  # v2: no degenerate boxes
    if not (folder / "meta.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_export(folder, images, boxes)
        print(f"generated {folder} in {time.perf_counter() - start:.0f} s", flush=True)
    return folder, json.loads((folder / "meta.json").read_text())


def baseline_tree(cache: Path, ref: str) -> Path:
    """The plugins folder of `ref`, extracted once (`git archive`)."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", ref + "^{commit}"],
                            capture_output=True, text=True, check=True).stdout.strip()
    folder = cache / f"baseline-{commit[:12]}"
    if not (folder / "plugins").is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=cache))
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "plugins"],
                                 capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        os.rename(tmp, folder)
    return folder / "plugins"


def run_ingest(plugins: Path, export: Path, meta: dict) -> dict:
    """One ingest in a fresh child with `plugins` first on the path."""
    with tempfile.TemporaryDirectory(prefix="odapi-bench-ingest-") as out:
        env = {**os.environ, "PYTHONPATH": str(plugins)}
        done = subprocess.run([sys.executable, "-c", CHILD, str(export), f"{out}/ingest"],
                              capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"ingest with {plugins} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["images"], result["boxes"]) == (meta["kept_images"], meta["kept_boxes"]), \
        (result, meta)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, default=15_000_000)
    parser.add_argument("--images", type=int, default=1_700_000)
    parser.add_argument("--small-boxes", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline-ref", default=BASELINE_REF)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) /
                        "odapi-bench-ingest-openimages")
    args = parser.parse_args()
    ours = ROOT / "plugins"
    small_images = max(1, args.small_boxes * args.images // args.boxes)
    small, small_meta = cached_export(args.cache, small_images, args.small_boxes)
    baseline = baseline_tree(args.cache, args.baseline_ref)

    rates = {(name, clock): [] for name in ("baseline", "ours") for clock in ("seconds", "cpu")}
    prints: set[str] = set()
    for _ in range(args.repeat):  # interleaved, so a busy spell hits both
        for name, plugins in (("baseline", baseline), ("ours", ours)):
            result = run_ingest(plugins, small, small_meta)
            for clock in ("seconds", "cpu"):
                rates[name, clock].append(small_meta["kept_boxes"] / result[clock])
            prints.add(result["fingerprint"])
    assert len(prints) == 1, f"the baseline and this tree give different versions: {prints}"
    median = {key: statistics.median(values) for key, values in rates.items()}
    print(f"{args.small_boxes} boxes / {small_images} images (unsorted, "
          f"{small_meta['boxes_csv_mb']} MB boxes CSV), median of {args.repeat}:")
    print("                                boxes/s (wall)  boxes/CPU-s")
    for label, name in ((f"in-memory ingest ({args.baseline_ref})", "baseline"),
                        ("this tree", "ours")):
        print(f"  {label:30s}{median[name, 'seconds']:12.0f}{median[name, 'cpu']:13.0f}")
    print(f"  {'ratio this/in-memory':30s}"
          f"{median['ours', 'seconds'] / median['baseline', 'seconds']:12.2f}"
          f"{median['ours', 'cpu'] / median['baseline', 'cpu']:13.2f}  (goal >= 0.8)")

    big, big_meta = cached_export(args.cache, args.images, args.boxes)
    result = run_ingest(ours, big, big_meta)
    print(f"{args.boxes} boxes / {args.images} images (unsorted, {big_meta['boxes_csv_mb']} MB "
          f"boxes CSV), this tree:")
    print(f"  {big_meta['kept_boxes'] / result['seconds']:10.0f} boxes/s "
          f"({result['seconds']:.0f} s wall), {big_meta['kept_boxes'] / result['cpu']:.0f} "
          f"boxes/CPU-s ({result['cpu']:.0f} CPU-s), peak RSS {result['peak_rss_mb']:.0f} MB "
          f"(goal <= 1024 MB)")


if __name__ == "__main__":
    main()
