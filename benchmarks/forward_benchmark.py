"""Forward time and peak memory of the torch reference and the Paddle port, same weights,
same batch, same number of CPU threads, each framework in a fresh process.

    python benchmarks/forward_benchmark.py --model biformer_small --batch-size 8 [--threads 2] [--repeat 5]

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

def rss_kib(field):
    with open("/proc/self/status") as status:
        return int(next(line.split()[1] for line in status if line.startswith(field)))

from converter.registry import get_spec
size = get_spec(model).preprocessing.input_size
x = np.random.default_rng(0).standard_normal((batch_size, 3, size, size), dtype=np.float32)
if framework == "torch":
    import torch
    torch.set_num_threads(threads)
    from converter import create_torch_model
    net = create_torch_model(model, ckpt)
    inp = torch.from_numpy(x)
    def forward():
        with torch.no_grad():
            return net(inp).numpy()
else:
    import paddle
    from converter import create_paddle_model
    net = create_paddle_model(model, ckpt)
    inp = paddle.to_tensor(x)
    def forward():
        with paddle.no_grad():
            return net(inp).numpy()
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


def measure(framework: str, model: str, batch_size: int, repeat: int, threads: int, weights: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOG_minloglevel="2", OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", CHILD, framework, model, str(batch_size), str(repeat),
                          str(threads), str(weights)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="biformer_small")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from converter import convert
    from converter.fixtures import make_official_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_official_checkpoint(args.model, Path(tmp) / "model.pth")
        params = Path(tmp) / "model.pdparams"
        convert(args.model, ckpt, params)
        torch_run = measure("torch", args.model, args.batch_size, args.repeat, args.threads, ckpt)
        paddle_run = measure("paddle", args.model, args.batch_size, args.repeat, args.threads, params)
    print(f"{args.model}, batch {args.batch_size}, {args.threads} thread(s), CPU float32, "
          f"median (min) of {args.repeat} after a warm-up")
    for name, run in (("torch", torch_run), ("paddle", paddle_run)):
        print(f"  {name:<7} {run['median'] * 1000:8.0f} ms ({run['min'] * 1000:.0f} ms)   "
              f"forward peak memory {run['peak_mib']:.0f} MiB")
    print(f"  paddle / torch time: {paddle_run['median'] / torch_run['median']:.2f}x")


if __name__ == "__main__":
    main()
