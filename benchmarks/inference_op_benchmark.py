"""What Paddle Inference's CPU kernels cost against torch eager's, op by op, on the shapes the exported
models run: the per-op profile behind issue 15's remaining batch-1 ratios.

    python benchmarks/inference_op_benchmark.py [--onednn fused] [--repeat 15]

Each candidate is a chain of ten calls of one op in a saved static graph under a Paddle Inference
CPU predictor in export's configuration ``--onednn`` ("fused", the fastest, by default), one thread; torch
runs the same chain in eager mode.  Call i reads its input plus i (so no pass merges the calls); that
add is part of every candidate's time, torch's too; a second operand is a constant of the graph.  Time: median of --repeat runs of the
chain after a warm-up, divided by ten (µs per call); error: max abs error of the first call's output
against the same op in float64, relative to that output's max |value|.  One markdown table.

Rows: a scale of 8 values (two ops a call with the chain's add: the per-op cost a graph of a few
thousand ops pays at batch 1); softmax over the last axis (BiFormer's routed and global attention
and CrossFormer's windows at batch 1) by Paddle's kernel and by Paddle's primitives (each row's max by
a [1, n] max pool, expanded by a product with a row of ones, subtracted, exp, the row sums by a product
with a column of ones, their reciprocals expanded, multiply: no pass merges them); the max, exp and
subtract alone (what bounds any such decomposition); ``attn @ v`` by Paddle's matmul and moved onto
oneDNN's (a scale by 1.0 after it, which the fuse pass takes in); the LePE depthwise 5x5 conv on an
NHWC map, as an NCHW conv between two transposes (what the models export) and as Paddle's NHWC conv;
FCViT's GroupNorm (one group, plus the block's residual add) as the models export it
(numerics.GroupNorm, as accurate as torch's) and by Paddle's single ``group_norm`` op.

A candidate faster here is not yet faster in a model: the softmax by primitives, 0.4-0.8x Paddle's
kernel in these chains, came out even inside biformer_small's exported graph (Paddle's profiler, batch
1: the softmax 14.7 ms per forward, its replacement's ops 16.2 ms in a run ~10% slower; interleaved
A/B of the two exports over twenty rounds 194.3 vs 195.2 ms), so the models keep Paddle's softmax;
the README's Benchmarks gives what came of each row.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kernel_benchmark import median_ms  # noqa: E402

CHAIN = 10
ATTENTION = [(2, 49, 64, 64), (4, 49, 16, 64), (8, 49, 4, 64), (1, 8, 49, 49),  # biformer_small, batch 1
             (64, 3, 49, 49), (16, 6, 49, 49)]  # crossformer_small's first two stages' windows
ATTENTION_V = [((2, 49, 64, 64), (2, 49, 64, 32)), ((8, 49, 4, 64), (8, 49, 64, 32))]
LEPE = [(1, 56, 56, 64), (1, 14, 14, 256)]
GROUP_NORM = [(1, 64, 56, 56), (1, 320, 14, 14)]  # fcvit_b12's first and third stages


# --------------------------------------------------------------------------------------------------
# float64 references, and the softmax by Paddle's primitives
# --------------------------------------------------------------------------------------------------

def _softmax64(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _softmax_by_primitives(x):
    import paddle

    n = x.shape[-1]
    row = paddle.ones([1, n], dtype=x.dtype)
    peaks = paddle.nn.functional.max_pool2d(x, kernel_size=[1, n])  # 4-D x read as an NCHW map
    e = paddle.exp(x - paddle.matmul(peaks, row))
    sums = paddle.matmul(e, paddle.ones([n, 1], dtype=x.dtype))
    return e * paddle.matmul(1.0 / sums, row)


def _group_norm64(x):
    rows = x.reshape(x.shape[0], -1)
    normed = (rows - rows.mean(1, keepdims=True)) / np.sqrt(rows.var(1, keepdims=True) + 1e-5)
    return normed.reshape(x.shape) + x


# --------------------------------------------------------------------------------------------------
# Chains
# --------------------------------------------------------------------------------------------------

def paddle_chain(op, x, operands, onednn: str, directory: str, layers=()):
    """``op(x + i, *operands)`` for i < CHAIN, saved as a static graph with ``x``'s shape as its one
    input (``operands``, numpy arrays, held as the graph's buffers) and loaded by a predictor in
    export's configuration ``onednn`` (``converter.export.configure_cpu``), one thread: a function
    from a batch to the first call's output.  Not ``converter.export.inference_runner``: it discards
    the C++ stdout around every run, ~0.25 ms that would swamp the small ops' rows."""
    import paddle
    from paddle import inference

    from converter.export import configure_cpu, graph_file

    class Chain(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.parts = paddle.nn.LayerList(layers)
            for i, operand in enumerate(operands):
                self.register_buffer(f"operand{i}", paddle.to_tensor(operand))
            # a saved graph needs one parameter at least
            self.zero = self.create_parameter([1], default_initializer=paddle.nn.initializer.Constant(0.0))

        def forward(self, x):
            rest = [getattr(self, f"operand{i}") for i in range(len(operands))]
            outs = [op(x + float(i), *rest) for i in range(CHAIN)]
            return outs[0], paddle.concat([o.reshape([-1])[:1] for o in outs[1:]]) + self.zero

    prefix = Path(directory) / f"chain{len(os.listdir(directory))}"
    spec = [paddle.static.InputSpec(list(x.shape), "float32")]
    paddle.jit.save(paddle.jit.to_static(Chain(), input_spec=spec, full_graph=True), str(prefix))
    config = inference.Config(str(graph_file(prefix)), str(prefix.with_suffix(".pdiparams")))
    configure_cpu(config, onednn)
    config.set_cpu_math_library_num_threads(1)
    config.disable_glog_info()
    predictor = inference.create_predictor(config)
    feed = predictor.get_input_handle(predictor.get_input_names()[0])
    fetch = predictor.get_output_handle(predictor.get_output_names()[0])

    def run(batch):
        feed.reshape(list(batch.shape))
        feed.copy_from_cpu(batch)
        predictor.run()
        return fetch.copy_to_cpu()
    return run


def torch_chain(op, operands):
    import torch

    rest = [torch.from_numpy(a) for a in operands]

    def run(x):
        with torch.no_grad():
            outs = [op(torch.from_numpy(x) + float(i), *rest) for i in range(CHAIN)]
            torch.cat([o.reshape(-1)[:1] for o in outs[1:]])
        return outs[0].numpy()
    return run


def table_row(what, x, runs, exact, repeat) -> str:
    """``runs``: (label, run) pairs, torch's last; each cell the time per call (``median_ms`` of the
    chain over CHAIN), its ratio to torch's and the relative error."""
    timed = [(label, median_ms(lambda: run(x), repeat) * 1e3 / CHAIN, run(x)) for label, run in runs]
    torch_us = timed[-1][1]
    scale = max(float(np.abs(exact).max()), 1e-30)
    cells = [f"{label} {us:.0f} µs ({us / torch_us:.2f}x, {np.abs(out - exact).max() / scale:.1e})"
             for label, us, out in timed]
    return f"| {what} | {list(x.shape)} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onednn", choices=("off", "on", "fused"), default="fused")
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from converter.cli import prefer_mkl_avx2_on_amd

    prefer_mkl_avx2_on_amd()  # as the CLI runs Paddle's MKL
    import paddle
    import torch

    from paddle_models import numerics

    paddle.set_device("cpu")
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    lines = [f"Paddle Inference (oneDNN {args.onednn}, 1 thread) vs torch eager: µs per call (ratio to torch, "
             f"max abs error / max |float64 output|)", "",
             "| op | shape | candidates |", "|---|---|---|"]
    with tempfile.TemporaryDirectory() as directory:
        def add(what, op_pd, op_torch, exact_fn, arrays, layers=(), extra=()):
            x, operands = arrays[0], arrays[1:]
            runs = [(label, paddle_chain(fn, x, operands, args.onednn, directory, lay))
                    for label, fn, lay in (("Paddle", op_pd, layers),) + tuple(extra)]
            runs.append(("torch", torch_chain(op_torch, operands)))
            exact = exact_fn(*[a.astype(np.float64) for a in arrays])
            lines.append(table_row(what, x, runs, exact, args.repeat))

        small = rng.standard_normal((1, 8)).astype(np.float32)
        add("scale (per-op cost)", lambda x: x * 1.0, lambda x: x * 1.0, lambda x: x, [small])
        for shape in ATTENTION:
            x = (rng.standard_normal(shape) * 3).astype(np.float32)
            add("softmax", lambda t: paddle.nn.functional.softmax(t, axis=-1), lambda t: torch.softmax(t, -1),
                _softmax64, [x], extra=[("by primitives", _softmax_by_primitives, ())])
        x = (rng.standard_normal(ATTENTION[0]) * 3).astype(np.float32)
        add("max over last axis", lambda t: paddle.max(t, axis=-1, keepdim=True),
            lambda t: t.amax(-1, keepdim=True), lambda t: t.max(-1, keepdims=True), [x],
            extra=[("[1, n] max pool", lambda t: paddle.nn.functional.max_pool2d(t, kernel_size=[1, t.shape[-1]]), ())])
        add("exp", paddle.exp, torch.exp, np.exp, [x])
        add("subtract (same shape)", lambda t, u: t - u, lambda t, u: t - u, lambda t, u: t - u, [x, x.copy()])
        for shape_a, shape_v in ATTENTION_V:
            a = _softmax64(rng.standard_normal(shape_a)).astype(np.float32)
            v = rng.standard_normal(shape_v).astype(np.float32)
            add("attn @ v", paddle.matmul, torch.matmul, np.matmul, [a, v],
                extra=[("on oneDNN", lambda t, u: paddle.matmul(t, u) * 1.0, ())])
        for shape in LEPE:
            x = rng.standard_normal(shape).astype(np.float32)
            c = shape[-1]
            nchw = paddle.nn.Conv2D(c, c, 5, padding=2, groups=c)
            nhwc = paddle.nn.Conv2D(c, c, 5, padding=2, groups=c, data_format="NHWC")
            nhwc.weight.set_value(nchw.weight)
            nhwc.bias.set_value(nchw.bias)
            conv = torch.nn.Conv2d(c, c, 5, padding=2, groups=c)
            with torch.no_grad():
                conv.weight.copy_(torch.from_numpy(nchw.weight.numpy()))
                conv.bias.copy_(torch.from_numpy(nchw.bias.numpy()))

            def exact(t, conv=conv):
                weight, bias = conv.weight.detach().double(), conv.bias.detach().double()
                out = torch.nn.functional.conv2d(torch.from_numpy(t).permute(0, 3, 1, 2), weight, bias, padding=2, groups=c)
                return out.permute(0, 2, 3, 1).numpy()
            add("depthwise 5x5, NHWC map: NCHW conv between transposes",
                lambda t, m=nchw: m(t.transpose([0, 3, 1, 2])).transpose([0, 2, 3, 1]),
                lambda t, m=conv: m(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), exact, [x], layers=(nchw,),
                extra=[("NHWC conv", lambda t, m=nhwc: m(t), (nhwc,))])
        for shape in GROUP_NORM:
            x = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)
            ours = numerics.GroupNorm(1, shape[1])
            paddles = paddle.nn.GroupNorm(1, shape[1])
            add("GroupNorm + residual: numerics.GroupNorm", lambda t, m=ours: m(t) + t,
                lambda t: torch.nn.functional.group_norm(t, 1, eps=1e-5) + t, _group_norm64, [x], layers=(ours,),
                extra=[("Paddle's group_norm", lambda t, m=paddles: m(t) + t, (paddles,))])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
