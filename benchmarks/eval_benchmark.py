"""Eval throughput of each framework: images per second of model forward time at a given batch
size, on a generated labelled folder (JPEGs of ImageNet's typical 500x375), through
``converter.evaluate.run_eval`` exactly as ``torch2paddle eval`` runs it, Paddle given torch's
CPU thread count first.

    python benchmarks/eval_benchmark.py [--model fcvit_b12] [--batch-size 32] [--batches 5]

The first batch is warm-up and is excluded from images/s (run_eval does that); the weights are
seeded random ones (speed does not depend on them).  Run it on an otherwise idle machine: both
frameworks use every core (or OMP_NUM_THREADS threads, when it is set).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_image_folder(root: Path, count: int, classes: int = 10) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    for i in range(count):
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(base, 7 * i, axis=1)).save(folder / f"{i:05d}.JPEG", quality=90)
    return root


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fcvit_b12")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=5, help="including the warm-up batch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--paddle-runtime", choices=("auto", "dygraph", "inference"), default="auto")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from converter.cli import _quiet_framework_logs, prefer_mkl_avx2_on_amd

    _quiet_framework_logs()
    prefer_mkl_avx2_on_amd()  # as the CLI runs Paddle
    import paddle
    import torch

    from converter.evaluate import run_eval
    from converter.extras import same_threads_for_both_frameworks
    from converter.fixtures import make_official_checkpoint

    same_threads_for_both_frameworks(torch)  # as the CLI does before eval runs

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = make_official_checkpoint(args.model, tmp / f"{args.model}.pth")
        data = write_image_folder(tmp / "val", args.batch_size * args.batches)
        report = run_eval(args.model, data, src, batch_size=args.batch_size, workers=args.workers,
                          num_classes=1000, progress=False, paddle_runtime=args.paddle_runtime)
    print(f"model {args.model}, batch {args.batch_size}, {report.images} images "
          f"({args.batches - 1} timed batches after 1 warm-up), {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), paddle {paddle.__version__}, "
          f"Paddle ran as {report.paddle_runtime}{'; ' + report.paddle_runtime_note if report.paddle_runtime_note else ''}")
    for framework in ("torch", "paddle"):
        score = getattr(report, framework)
        print(f"{framework:<7} {score['images_per_second']:7.1f} images/s  "
              f"({score['forward_seconds']:.1f} s forward)")
    print(f"agreement {report.agreement:.1f}%, max abs logit error {report.max_abs_logit_err:.2e}, "
          f"wall {report.wall_seconds:.1f} s (incl. conversion and decoding)")


if __name__ == "__main__":
    main()
