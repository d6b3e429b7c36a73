"""The compiled CPU kernels (paddle_models/native.py) against the Paddle ops they replace and torch's,
one op at a time, on the shapes the models run: time (median of --repeat calls after a warm-up, one
thread unless OMP_NUM_THREADS says otherwise) and max abs error against the same op in float64.

    OMP_NUM_THREADS=1 python benchmarks/kernel_benchmark.py [--repeat 5]

"Paddle" is what the ports ran before the kernels (and still run where they are not built): Paddle's
conv for a depthwise conv (the FFT route too for 11x11, FCViT's), Paddle's GELU, numerics.GroupNorm's
float32 statistics by Paddle's ops.  Inputs N(0, 1) (GroupNorm: mean 3, std 2); one markdown table.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEPTHWISE = [((8, 256, 56, 56), 3), ((8, 512, 28, 28), 3), ((8, 2048, 7, 7), 3), ((1, 2048, 7, 7), 3),
             ((8, 64, 56, 56), 5), ((8, 64, 56, 56), 11), ((8, 512, 7, 7), 11), ((1, 64, 56, 56), 11)]
ELEMENTWISE = [(8, 256, 56, 56), (1, 1536, 14, 14)]
GROUP_NORM = [(8, 64, 56, 56), (1, 64, 56, 56), (8, 512, 7, 7)]


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def row(op, shape, repeat, exact, candidates) -> str:
    """One table row: each candidate's time (the op alone: it returns a tensor of its framework) and
    max abs error against ``exact``."""
    cells = []
    for label, fn in candidates:
        error = float(np.abs(fn().numpy().astype(np.float64) - exact).max())
        cells.append(f"{label} {median_ms(fn, repeat):.1f} ms ({error:.1e})")
    return f"| {op} | {list(shape)} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    import paddle
    import paddle.nn.functional as F
    import torch

    from paddle_models import native, numerics
    from paddle_models.depthwise import depthwise_conv2d_fft

    if not native.native_kernels_available():
        sys.exit("error: the compiled kernels are not built here (see the warning above)")
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    lines = ["| op | shape | Paddle (max abs error vs float64) | compiled kernel | torch |", "|---|---|---|---|---|"]
    with paddle.no_grad(), torch.no_grad():
        for shape, k in DEPTHWISE:
            x, w = rng.standard_normal(shape), rng.standard_normal((shape[1], 1, k, k)) / k
            exact = F.conv2d(paddle.to_tensor(x), paddle.to_tensor(w), padding=k // 2, groups=shape[1]).numpy()
            px, pw = paddle.to_tensor(x.astype(np.float32)), paddle.to_tensor(w.astype(np.float32))
            tx, tw = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(w.astype(np.float32))
            paddle_route = ("FFT", lambda: depthwise_conv2d_fft(px, pw)) if k >= 11 else \
                ("conv", lambda: F.conv2d(px, pw, padding=k // 2, groups=shape[1]))
            lines.append(row(f"depthwise {k}x{k}", shape, args.repeat, exact, [
                paddle_route, ("kernel", lambda: native.native_depthwise_conv2d(px, pw)),
                ("conv", lambda: torch.nn.functional.conv2d(tx, tw, padding=k // 2, groups=shape[1]))]))
        for shape in ELEMENTWISE:
            x = rng.standard_normal(shape)
            exact = x * 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
            px, tx = paddle.to_tensor(x.astype(np.float32)), torch.from_numpy(x.astype(np.float32))
            lines.append(row("GELU", shape, args.repeat, exact, [
                ("gelu", lambda: F.gelu(px)), ("kernel", lambda: native.native_gelu(px)),
                ("gelu", lambda: torch.nn.functional.gelu(tx))]))
        for shape in GROUP_NORM:
            x = rng.standard_normal(shape) * 2.0 + 3.0
            rows = x.reshape(shape[0], -1)
            exact = ((rows - rows.mean(1, keepdims=True)) / np.sqrt(rows.var(1, keepdims=True) + 1e-5)).reshape(shape)
            layer = numerics.GroupNorm(1, shape[1])
            px, tx = paddle.to_tensor(x.astype(np.float32)), torch.from_numpy(x.astype(np.float32))
            flat = px.reshape([shape[0], -1])
            ops_route = lambda: numerics._NormalizeRows.apply(flat, rows.shape[1], 1e-5).reshape(shape)
            lines.append(row("GroupNorm (1 group)", shape, args.repeat, exact, [
                ("ops", ops_route),
                ("kernel", lambda: native.native_group_norm(px, layer.weight, layer.bias, 1, 1e-5)),
                ("group_norm", lambda: torch.nn.functional.group_norm(tx, 1, eps=1e-5))]))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
