"""Training throughput: `odapi train` against a bare TF-Vision `train_lib.run_experiment`.

Same records (the demo's, see _common.py), same config: the baseline reads the
params.yaml that `odapi train` wrote (the sample model with the pipeline's data, steps and
batch filled in) and runs what TF-Vision's own driver (`official/vision/train.py`) does with
it: the distribution strategy `params.runtime` asks for, `task_factory.get_task`,
`train_lib.run_experiment(mode="train")`, in a fresh process, no odapi code. A second baseline
runs the same with TensorFlow's default strategy, which odapi uses on a machine without GPUs.
Runs alternate; every training starts from scratch in its own folder.

Per run: the wall seconds from launch to exit, the steady rate in steps/s (from the end of the
first training loop, which holds the graph tracing, to the end of the last), and start-up =
launch to the end of the first loop minus that loop's steps at the steady rate (imports, model
build, tracing); "after" = the last loop's end to the process's exit (final checkpoint).
Prints medians and the ratio odapi / baseline of the steady rate (goal >= 0.95) and of
start-up.

    .venv/bin/python bench/train.py [--steps 300] [--rounds 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import BARE_PRELUDE, SAMPLE_MODEL, demo_records, load, use_this_tree

use_this_tree()

# The baseline child: argv = experiment, params.yaml, model dir, strategy ("driver"|"default").
# One line per training loop (a train action, as TF-Vision's driver takes them).
BARE_TRAIN = BARE_PRELUDE + """
from official.common import distribute_utils
from official.core import task_factory, train_lib

experiment, params_yaml, model_dir, strategy = sys.argv[1:]
params = bare_params(experiment, params_yaml)
if strategy == "driver":
    strategy = distribute_utils.get_distribution_strategy(
        distribution_strategy=params.runtime.distribution_strategy,
        all_reduce_alg=params.runtime.all_reduce_alg, num_gpus=params.runtime.num_gpus,
        tpu_address=params.runtime.tpu)
else:
    strategy = tf.distribute.get_strategy()
with strategy.scope():
    task = task_factory.get_task(params.task, logging_dir=model_dir)
train_lib.run_experiment(distribution_strategy=strategy, task=task, mode="train", params=params,
                         model_dir=model_dir,
                         train_actions=[lambda output: print("progress: loop", flush=True)])
"""


def timed(command: list[str], per_loop: int, steps: int) -> dict:
    """Run `command`; time its 'progress:' lines (one per training loop) as they arrive."""
    launched = time.monotonic()
    loops: list[float] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as child:
        for line in child.stdout:
            if line.startswith("progress:"):
                loops.append(time.monotonic())
        error = child.stderr.read()
    if child.returncode or len(loops) < 2:
        sys.exit(f"{' '.join(command[:5])} ... failed ({len(loops)} loops):\n{error[-3000:]}")
    ended = time.monotonic()
    rate = (steps - per_loop) / (loops[-1] - loops[0])
    return {"wall": ended - launched, "rate": rate,
            "startup": loops[0] - launched - per_loop / rate, "tail": ended - loops[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", help="keep records and models here (records are reused)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="odapi-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    data = demo_records(work)
    per_loop = 50  # the sample config's trainer.steps_per_loop
    odapi = [sys.executable, "-m", "odapi_operators", "train", "--model-config",
             str(SAMPLE_MODEL), "--data", str(data), "--steps", str(args.steps),
             "--batch-size", "8", "--no-warm-start", "--out"]
    runs: dict[str, list[dict]] = {"odapi train": [], "bare, driver's strategy": [],
                                   "bare, default strategy": []}
    folders = dict(zip(runs, ["odapi", "bare-driver", "bare-default"]))
    print(f"{args.steps} steps, batch 8; load average before: {load()}", flush=True)
    params = None
    for round_ in range(args.rounds):
        for name, found in runs.items():
            out = work / f"{folders[name]}-{round_}"
            if out.exists():
                subprocess.run(["rm", "-rf", str(out)], check=True)
            if name == "odapi train":
                command = [*odapi, str(out)]
            else:
                command = [sys.executable, "-c", BARE_TRAIN, "retinanet_mobile_coco",
                           str(params), str(out),
                           "driver" if "driver" in name else "default"]
            found.append(timed(command, per_loop, args.steps))
            if params is None:
                params = work / "params.yaml"
                params.write_bytes((out / "params.yaml").read_bytes())
            last = found[-1]
            print(f"round {round_ + 1} {name}: {last['wall']:.1f} s wall, {last['rate']:.2f} "
                  f"steps/s, start-up {last['startup']:.1f} s, after the last loop "
                  f"{last['tail']:.1f} s (load {load()})", flush=True)
    medians = {name: {key: statistics.median(r[key] for r in found) for key in found[0]}
               for name, found in runs.items()}
    print(f"\n{'':26} {'wall s':>8} {'steps/s':>8} {'start-up s':>11} {'after s':>8}")
    for name, m in medians.items():
        print(f"{name:26} {m['wall']:8.1f} {m['rate']:8.2f} {m['startup']:11.1f} "
              f"{m['tail']:8.1f}")
    ours = medians["odapi train"]
    for name in list(medians)[1:]:
        print(f"ratio odapi / {name}: steps/s {ours['rate'] / medians[name]['rate']:.2f} "
              f"(goal >= 0.95), start-up {ours['startup'] / medians[name]['startup']:.2f}, "
              f"wall {ours['wall'] / medians[name]['wall']:.2f}")
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
