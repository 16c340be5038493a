"""Benchmark: download + verify/resize images from a local server, odapi vs the alternatives.

Two servers on 127.0.0.1 (started here, each in its own process): one answering at once, one
answering every request after --delay seconds, like a real image host. Same URL list, same
output size limit (--max-side) for every contender, each run as its own process and timed
wall-clock from start to exit:

- odapi: `prepare.fetch_and_verify` (what `odapi prepare` runs: decoding in worker processes
  overlaps the downloads), and also `odapi download` then `odapi verify` one after the other
  (the DAG's two tasks);
- seed: the tutorial's approach, ProcessPoolExecutor(16), one `requests.get` per image, then
  open + verify + reopen + thumbnail;
- img2dataset (installed in its own venv, created on first use; never in requirements.txt):
  processes_count = cores, thread_count from --i2d-threads (the best one is compared), resize
  keep_ratio to --max-side only if bigger;
- odapi re-run over the same inputs: its time as a share of the first run, and the requests
  the server saw (must be 0).

    .venv/bin/python bench/download.py [--images 600] [--delay 0.2] [--skip-img2dataset]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from _image_server import ImageServer  # noqa: E402

ODAPI = [sys.executable, "-m", "odapi_operators"]
I2D_VENV = Path(os.environ.get("ODAPI_BENCH_I2D_VENV", "/tmp/odapi-bench/venv-img2dataset"))

SEED = """
import sys, requests
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from PIL import Image

def one(job):
    url, out, side = job
    try:
        data = requests.get(url, timeout=10).content
        path = Path(out) / url.rsplit("/", 1)[-1]
        path.write_bytes(data)
        Image.open(path).verify()
        image = Image.open(path)
        image.thumbnail((side, side))
        image.convert("RGB").save(path.with_suffix(".small.jpg"), quality=95)
        return True
    except Exception:
        return False

urls = open(sys.argv[1]).read().split()
with ProcessPoolExecutor(16) as pool:
    ok = sum(pool.map(one, [(u, sys.argv[2], int(sys.argv[3])) for u in urls]))
print(ok)
"""


def make_images(folder: Path, count: int, size=(640, 480)) -> None:
    """Photo-like JPEGs (smooth gradients + grain, ~40-60 kB), all different."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    for i in range(count):
        a, b, c = rng.uniform(0.2, 1.0, 3)
        base = np.stack([x * a, y * b, (x + y) * c / 2], axis=-1) % 256
        grain = rng.normal(0, 6, base.shape)
        pixels = np.clip(base + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:05d}.jpg", quality=85)


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if run.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed:\n{run.stderr[-2000:]}")
    return seconds, run.stdout


FUSED = """
import json, sys
from odapi_operators.core.data.prepare import fetch_and_verify
fetched, verified = fetch_and_verify(sys.argv[1], sys.argv[2], max_side=int(sys.argv[3]))
print(json.dumps([fetched, verified]))
"""


def odapi_fused(manifest: Path, out: Path, max_side: int) -> tuple[float, dict]:
    seconds, stdout = timed([sys.executable, "-c", FUSED, str(manifest), str(out), str(max_side)])
    fetched, verified = json.loads(stdout)
    assert verified["ok"] == fetched["total"], (fetched, verified)
    return seconds, {"skipped": fetched["skipped"], "verify_skipped": verified["skipped"],
                     "stage_seconds": round(fetched["seconds"] + verified["seconds"], 3)}


def odapi(manifest: Path, out: Path, max_side: int) -> tuple[float, dict]:
    t1, fetched = timed(ODAPI + ["download", "--manifest", str(manifest), "--out",
                                 str(out / "images"), "--no-progress"])
    t2, verified = timed(ODAPI + ["verify", "--manifest", str(out / "images" / "manifest.jsonl"),
                                  "--out", str(out / "verify"), "--max-side", str(max_side),
                                  "--no-progress"])
    fetched, verified = json.loads(fetched), json.loads(verified)
    assert verified["ok"] == fetched["total"], (fetched, verified)
    return t1 + t2, {"download_s": round(t1, 2), "verify_s": round(t2, 2),
                     "skipped": fetched["skipped"], "verify_skipped": verified["skipped"]}


def seed(urls: Path, out: Path, max_side: int, count: int) -> float:
    out.mkdir()
    seconds, stdout = timed([sys.executable, "-c", SEED, str(urls), str(out), str(max_side)])
    assert int(stdout) == count, stdout
    return seconds


def ensure_img2dataset() -> Path | None:
    python = I2D_VENV / "bin" / "python"
    if not (I2D_VENV / "bin" / "img2dataset").exists():
        print(f"(creating {I2D_VENV} with img2dataset: a few minutes, once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(I2D_VENV)], check=True)
        installed = subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                                    "img2dataset"], capture_output=True, text=True)
        if installed.returncode:
            print(f"img2dataset could not be installed: {installed.stderr[-500:]}")
            return None
    return I2D_VENV / "bin" / "img2dataset"


def img2dataset(tool: Path, urls: Path, out: Path, max_side: int, threads: int,
                count: int) -> float:
    per_shard = max(50, math.ceil(count / (4 * (os.cpu_count() or 1))))
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    seconds, _ = timed([str(tool), "--url_list", str(urls), "--output_folder", str(out),
                        "--processes_count", str(os.cpu_count() or 1),
                        "--thread_count", str(threads), "--image_size", str(max_side),
                        "--resize_mode", "keep_ratio", "--resize_only_if_bigger", "True",
                        "--output_format", "files", "--number_sample_per_shard", str(per_shard),
                        "--timeout", "10", "--retries", "0", "--enable_wandb", "False"], env)
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    assert ok == count, f"img2dataset stored {ok} of {count}"
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--max-side", type=int, default=256)
    parser.add_argument("--i2d-threads", default="64,256",
                        help="img2dataset thread_count values to try (the best is compared)")
    parser.add_argument("--skip-img2dataset", action="store_true")
    args = parser.parse_args()
    tool = None if args.skip_img2dataset else ensure_img2dataset()
    with tempfile.TemporaryDirectory(prefix="odapi-bench-dl-") as name:
        tmp = Path(name)
        make_images(tmp / "served", args.images)
        size = sum(p.stat().st_size for p in (tmp / "served").iterdir()) / args.images
        print(f"{args.images} JPEGs of 640x480 ({size / 1e3:.0f} kB each), "
              f"output max side {args.max_side}, {os.cpu_count()} cores")
        for delay in (0.0, args.delay):
            with ImageServer(tmp / "served", delay) as server:
                label = f"server delay {delay * 1000:.0f} ms"
                work = tmp / f"d{delay}"
                work.mkdir()
                urls = work / "urls.txt"
                names = sorted(p.name for p in (tmp / "served").iterdir())
                urls.write_text("\n".join(server.url(n) for n in names) + "\n")
                manifest = work / "manifest.jsonl"
                manifest.write_text("".join(json.dumps({
                    "key": n[:-4], "source": {"kind": "url", "uri": server.url(n)},
                    "source_id": n, "width": None, "height": None, "boxes": []}) + "\n"
                    for n in names))
                ours, detail = odapi_fused(manifest, work / "odapi", args.max_side)
                before = server.requests()
                again, detail2 = odapi_fused(manifest, work / "odapi", args.max_side)
                rerun_requests = server.requests() - before
                sequential, parts = odapi(manifest, work / "odapi-seq", args.max_side)
                seed_s = seed(urls, work / "seed", args.max_side, args.images)
                i2d = {}
                if tool:
                    for threads in (int(t) for t in args.i2d_threads.split(",")):
                        i2d[threads] = img2dataset(tool, urls, work / f"i2d{threads}",
                                                   args.max_side, threads, args.images)
                rate = args.images / ours
                print(f"\n[{label}]")
                print(f"  odapi download+verify: {rate:8.1f} images/s  ({ours:.2f} s, overlapped)")
                print(f"  odapi, two commands:   {args.images / sequential:8.1f} images/s  "
                      f"({sequential:.2f} s: download {parts['download_s']} s + verify "
                      f"{parts['verify_s']} s)")
                print(f"  seed (16 procs, get):  {args.images / seed_s:8.1f} images/s  "
                      f"-> odapi/seed = {seed_s / ours:.2f}x")
                for threads, seconds in i2d.items():
                    print(f"  img2dataset t={threads:<4}:   {args.images / seconds:8.1f} images/s  "
                          f"-> odapi/img2dataset = {seconds / ours:.2f}x")
                if i2d:
                    best = min(i2d.values())
                    print(f"  odapi / best img2dataset = {best / ours:.2f}x")
                print(f"  re-run: {again:.2f} s = {again / ours:.1%} of the first run "
                      f"(stage time {detail2['stage_seconds']} s = "
                      f"{detail2['stage_seconds'] / ours:.1%}; the rest is interpreter start), "
                      f"{rerun_requests} requests (resumed {detail2['skipped']}, "
                      f"verify resumed {detail2['verify_skipped']})")


if __name__ == "__main__":
    main()
