"""Forward time and peak memory of the torch reference and the Paddle port, same weights,
same batch, same number of CPU threads, each framework in a fresh process.

    python benchmarks/forward_benchmark.py --model biformer_small --batch-size 8 [--threads 2] [--repeat 5]
    python benchmarks/forward_benchmark.py --dense      # one dense backbone per family, 800x1216, batch 1
    python benchmarks/forward_benchmark.py --train --model fcvit_tiny   # train-mode forward + backward

--train times one training step's compute: train mode (BatchNorm on batch statistics, dropout and
drop-path at rate 0, as ``verify --train`` runs them), cross-entropy on fixed labels (a dense
backbone: the mean of its squared maps), backward, gradients cleared; no optimizer step.

A dense backbone runs at --input-size (default 800x1216, a COCO image after the detectors' test
resize); its output is the list of feature maps.

Time: median (and min) of --repeat forwards after one warm-up.  Memory: the process's peak
RSS (VmHWM) minus its RSS just before the first forward, i.e. what the forward pass itself
needed.  Paddle caps itself at one thread unless OMP_NUM_THREADS is set, so the thread count
is pinned for both through OMP_NUM_THREADS (and torch.set_num_threads).
"""
from __future__ import annotations

import argparse
import json
import os
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
from converter.train import _loss, zero_stochastic_ops

def rss_kib(field):
    with open("/proc/self/status") as status:
        return int(next(line.split()[1] for line in status if line.startswith(field)))

x = np.random.default_rng(0).standard_normal((batch_size, 3, height, width), dtype=np.float32)
as_numpy = lambda out: [t.numpy() for t in out] if isinstance(out, (list, tuple)) else out.numpy()
if framework == "torch":
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


def measure(framework: str, model: str, batch_size: int, repeat: int, threads: int, weights: Path,
            size: str, mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOG_minloglevel="2", OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", CHILD, framework, model, str(batch_size), str(repeat),
                          str(threads), str(weights), size, mode], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def benchmark(model: str, batch_size: int, repeat: int, threads: int, input_size, mode: str = "forward") -> None:
    from converter import convert
    from converter.fixtures import make_official_checkpoint
    from converter.registry import get_spec

    spec = get_spec(model)
    size = input_size or ("800x1216" if spec.dense else f"{spec.preprocessing.input_size}x{spec.preprocessing.input_size}")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_official_checkpoint(model, Path(tmp) / "model.pth")
        params = Path(tmp) / "model.pdparams"
        convert(model, ckpt, params)
        torch_run = measure("torch", model, batch_size, repeat, threads, ckpt, size, mode)
        paddle_run = measure("paddle", model, batch_size, repeat, threads, params, size, mode)
    what = "train-mode forward + backward" if mode == "train" else "forward"
    print(f"{model}, {what}, {size}, batch {batch_size}, {threads} thread(s), CPU float32, "
          f"median (min) of {repeat} after a warm-up")
    for name, run in (("torch", torch_run), ("paddle", paddle_run)):
        print(f"  {name:<7} {run['median'] * 1000:8.0f} ms ({run['min'] * 1000:.0f} ms)   "
              f"{what} peak memory {run['peak_mib']:.0f} MiB")
    print(f"  paddle / torch time: {paddle_run['median'] / torch_run['median']:.2f}x", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="repeatable (default: biformer_small)")
    parser.add_argument("--dense", action="store_true", help=f"the models {', '.join(DENSE_PER_FAMILY)}, batch 1")
    parser.add_argument("--train", action="store_true", help="time train-mode forward + backward instead")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8, 1 with --dense")
    parser.add_argument("--input-size", metavar="HxW", help="default: official (dense backbones: 800x1216)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    models = args.model or (list(DENSE_PER_FAMILY) if args.dense else ["biformer_small"])
    batch_size = args.batch_size or (1 if args.dense else 8)
    for model in models:
        benchmark(model, batch_size, args.repeat, args.threads, args.input_size, "train" if args.train else "forward")


if __name__ == "__main__":
    main()
