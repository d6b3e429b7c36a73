"""Forward time and peak memory of the torch reference and the Paddle port, same weights,
same batch, same number of CPU threads, each framework in a fresh process.

    python benchmarks/forward_benchmark.py --model biformer_small --batch-size 8 [--threads 2] [--repeat 5]
    python benchmarks/forward_benchmark.py --dense      # one dense backbone per family, 800x1216, batch 1
    python benchmarks/forward_benchmark.py --train --model fcvit_tiny   # train-mode forward + backward
    python benchmarks/forward_benchmark.py --families --batch-size 1 --batch-size 8 --inference --threads 1 --rounds 3
        # the table of issue 15: one variant per family, torch eager, Paddle dygraph and the exported
        # model under Paddle Inference (oneDNN off / on / fused ops only), each batch size, one markdown table at the end

--train times one training step's compute: train mode (BatchNorm on batch statistics, dropout and
drop-path at rate 0, as ``verify --train`` runs them), cross-entropy on fixed labels (a dense
backbone: the mean of its squared maps), backward, gradients cleared; no optimizer step.

A dense backbone runs at --input-size (default 800x1216, a COCO image after the detectors' test
resize); its output is the list of feature maps.

--inference also exports the model (converter.export, dynamic batch, its checks included) and times
the saved model in a Paddle Inference CPU predictor with oneDNN off, on, and on for the fused ops
only (converter.export.ONEDNN), --threads math threads.

Time: median (and min) of --repeat forwards after one warm-up, in each of --rounds fresh processes
per runtime; the runtimes take turns, round after round, and each ratio to torch is the median of the
rounds' ratios, so a machine whose speed drifts during the run (a shared one) skews no runtime.
Memory: the process's peak RSS (VmHWM) minus its RSS just before the first forward, i.e. what the forward pass itself
needed.  Paddle caps itself at one thread unless OMP_NUM_THREADS is set, so the thread count
is pinned for both through OMP_NUM_THREADS (and torch.set_num_threads).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, statistics, sys, time
import numpy as np
framework, model, batch_size, repeat, threads, ckpt = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]), sys.argv[6]
height, width = map(int, sys.argv[7].split("x"))
train = sys.argv[8] == "train"

def rss_kib(field):
    with open("/proc/self/status") as status:
        return int(next(line.split()[1] for line in status if line.startswith(field)))

x = np.random.default_rng(0).standard_normal((batch_size, 3, height, width), dtype=np.float32)
as_numpy = lambda out: [t.numpy() for t in out] if isinstance(out, (list, tuple)) else out.numpy()
if framework.startswith("inference"):  # ckpt: the export's path prefix
    from pathlib import Path
    from converter.export import inference_runner
    run = inference_runner(Path(ckpt), onednn=framework.rsplit("-", 1)[1], threads=threads)
    forward = lambda: run(x)
elif framework == "torch":
    from converter.train import _loss
    import torch
    torch.set_num_threads(threads)
    from converter import create_torch_model
    net = create_torch_model(model, ckpt)
    inp, labels = torch.from_numpy(x), torch.zeros(batch_size, dtype=torch.int64)
    def forward():
        with torch.no_grad():
            return as_numpy(net(inp))
    def train_step():
        _loss(net(inp), labels, "torch").backward()
        net.zero_grad()
else:
    from converter.train import _loss
    import paddle
    from converter import create_paddle_model
    net = create_paddle_model(model, ckpt)
    inp, labels = paddle.to_tensor(x), paddle.zeros([batch_size], dtype="int64")
    def forward():
        with paddle.no_grad():
            return as_numpy(net(inp))
    def train_step():
        _loss(net(inp), labels, "paddle").backward()
        net.clear_gradients()
if train:
    from converter.train import zero_stochastic_ops
    net.train()
    zero_stochastic_ops(net, framework)
    forward = train_step
before = rss_kib("VmRSS")
forward()
times = []
for _ in range(repeat):
    start = time.perf_counter()
    forward()
    times.append(time.perf_counter() - start)
print(json.dumps({"median": statistics.median(times), "min": min(times),
                  "peak_mib": (rss_kib("VmHWM") - before) / 1024}))
"""


DENSE_PER_FAMILY = ("fcvit_b12_feat", "biformer_small_det", "crossformer_small_det", "regionvit_small_det")
PER_FAMILY = ("fcvit_b12", "biformer_small", "crossformer_small", "regionvit_small")
INFERENCE = (("inference-onednn-off", "Paddle Inference, oneDNN off"), ("inference-onednn-on", "Paddle Inference, oneDNN on"),
             ("inference-onednn-fused", "Paddle Inference, oneDNN fused ops only"))


def measure(framework: str, model: str, batch_size: int, repeat: int, threads: int, weights: Path,
            size: str, mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOG_minloglevel="2", OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", CHILD, framework, model, str(batch_size), str(repeat),
                          str(threads), str(weights), size, mode], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def combine_rounds(rounds: list) -> dict:
    """Per runtime over the rounds: the median of its per-round medians, the min of everything, the
    largest peak, and (not torch) the median of its per-round ratios to torch eager in the same round.
    A runtime that failed in any round is reported by its first error."""
    runs = {}
    for label in rounds[0]:
        failed = [one[label] for one in rounds if "error" in one[label]]
        if failed:
            runs[label] = failed[0]
            continue
        run = {"median": statistics.median(one[label]["median"] for one in rounds),
               "min": min(one[label]["min"] for one in rounds),
               "peak_mib": max(one[label]["peak_mib"] for one in rounds)}
        ratios = [one[label]["median"] / one["torch eager"]["median"] for one in rounds
                  if label != "torch eager" and "error" not in one["torch eager"]]
        if ratios:
            run["ratio"] = statistics.median(ratios)
        runs[label] = run
    return runs


def benchmark(model: str, batch_sizes, repeat: int, threads: int, input_size, mode: str = "forward",
              inference: bool = False, n_rounds: int = 1) -> list:
    """Each batch size: {model, batch_size, runs: {label: {median, min, peak_mib[, ratio]} or {error}}}."""
    from converter import convert
    from converter.fixtures import make_official_checkpoint
    from converter.registry import get_spec

    spec = get_spec(model)
    size = input_size or ("800x1216" if spec.dense else f"{spec.preprocessing.input_size}x{spec.preprocessing.input_size}")
    what = "train-mode forward + backward" if mode == "train" else "forward"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_official_checkpoint(model, Path(tmp) / "model.pth")
        params = Path(tmp) / "model.pdparams"
        convert(model, ckpt, params)
        runtimes = [("torch", "torch eager", ckpt), ("paddle", "Paddle dygraph", params)]
        if inference and mode == "forward" and not spec.dense:
            from converter.export import export_model
            report = export_model(model, params, Path(tmp) / "export")
            for key, label in INFERENCE:
                runtimes.append((key, label, Path(tmp) / "export" / "inference") if report.passed
                                else (None, label, "export failed its checks"))
        for batch_size in batch_sizes:
            rounds = []
            for _ in range(n_rounds):  # runtimes in turn, round after round: ratios survive a drifting machine
                one = {}
                for key, label, path in runtimes:
                    try:
                        one[label] = ({"error": path} if key is None else
                                      measure(key, model, batch_size, repeat, threads, path, size, mode))
                    except subprocess.CalledProcessError as exc:
                        one[label] = {"error": (exc.stderr.strip().splitlines() or ["failed"])[-1][:120]}
                rounds.append(one)
            runs = combine_rounds(rounds)
            print(f"{model}, {what}, {size}, batch {batch_size}, {threads} thread(s), CPU float32, "
                  f"median (min) over {n_rounds} round(s) of {repeat} after a warm-up; ratio: median of the rounds' ratios")
            for label, run in runs.items():
                if "error" in run:
                    print(f"  {label:<40} {run['error']}")
                else:
                    ratio = f"   {run['ratio']:.2f}x torch" if "ratio" in run else ""
                    print(f"  {label:<40} {run['median'] * 1000:8.0f} ms ({run['min'] * 1000:.0f} ms)   "
                          f"peak memory {run['peak_mib']:.0f} MiB{ratio}")
            print(flush=True)
            rows.append({"model": model, "batch_size": batch_size, "runs": runs})
    return rows


def markdown_table(rows: list) -> str:
    """One row per (model, batch size): time (and x torch eager) and peak memory of each runtime."""
    labels = list(dict.fromkeys(label for row in rows for label in row["runs"]))
    lines = ["| model | batch | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for row in rows:
        cells = []
        for label in labels:
            run = row["runs"].get(label, {"error": "-"})
            if "error" in run:
                cells.append(f"fails: {run['error']}")
                continue
            ratio = f" ({run['ratio']:.2f}x)" if "ratio" in run else ""
            cells.append(f"{run['median'] * 1000:.0f} ms{ratio}, {run['peak_mib']:.0f} MiB")
        lines.append(f"| {row['model']} | {row['batch_size']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="repeatable (default: biformer_small)")
    parser.add_argument("--families", action="store_true", help=f"the models {', '.join(PER_FAMILY)}")
    parser.add_argument("--dense", action="store_true", help=f"the models {', '.join(DENSE_PER_FAMILY)}, batch 1")
    parser.add_argument("--train", action="store_true", help="time train-mode forward + backward instead")
    parser.add_argument("--batch-size", type=int, action="append", help="repeatable; default 8, 1 with --dense")
    parser.add_argument("--inference", action="store_true",
                        help="also export the model and time it under Paddle Inference, oneDNN off, on and on for "
                             "fused ops only")
    parser.add_argument("--input-size", metavar="HxW", help="default: official (dense backbones: 800x1216)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=5, help="forwards per process (after a warm-up)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh processes per runtime, the runtimes in turn (ratios per round)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from converter.cli import prefer_mkl_avx2_on_amd
    prefer_mkl_avx2_on_amd()  # as the CLI runs Paddle (the child processes inherit it)
    models = args.model or (list(DENSE_PER_FAMILY) if args.dense else list(PER_FAMILY) if args.families
                            else ["biformer_small"])
    batch_sizes = args.batch_size or [1 if args.dense else 8]
    rows = []
    for model in models:
        rows += benchmark(model, batch_sizes, args.repeat, args.threads, args.input_size,
                          "train" if args.train else "forward", args.inference, args.rounds)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
