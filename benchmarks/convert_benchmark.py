"""Convert wall time and peak memory against two floors measured in the same run.

    python benchmarks/convert_benchmark.py [--model fcvit_b48] [--repeat 3]

Floors: a plain copy of the checkpoint file (time), and a process that only imports the
frameworks (memory).  Targets from issue 2: convert <= 3x the copy time; peak RSS <= the
import baseline + 2x the checkpoint size.  Each measurement runs in a fresh process so that
peak RSS (ru_maxrss of that child) belongs to it alone; times are the best of --repeat.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

IMPORT_ONLY = "import torch, paddle, converter.api"
CONVERT = """
import sys, time
import torch, paddle, converter.api
t = time.perf_counter()
converter.api.convert(sys.argv[1], sys.argv[2], sys.argv[3], force=True)
print(time.perf_counter() - t)
"""


def run_child(code: str, *args) -> tuple:
    """(stdout, wall seconds, peak RSS in MiB) of a fresh Python process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOG_minloglevel="2")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"child failed: {code[:40]!r}")
    return out, wall, usage.ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fcvit_b48")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from converter.fixtures import make_official_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = make_official_checkpoint(args.model, tmp / f"{args.model}.pth")
        size_mib = src.stat().st_size / 2**20
        copy_s = min(_timed_copy(src, tmp / "copy.pth") for _ in range(args.repeat))
        baseline = [run_child(IMPORT_ONLY) for _ in range(args.repeat)]
        runs = [run_child(CONVERT, args.model, src, tmp / "out.pdparams") for _ in range(args.repeat)]

    import_s = min(w for _, w, _ in baseline)
    base_rss = max(r for _, _, r in baseline)
    convert_s = min(float(out.strip().splitlines()[-1]) for out, _, _ in runs)
    process_s = min(w for _, w, _ in runs)
    peak_rss = max(r for _, _, r in runs)
    rows = [
        ("checkpoint", f"{args.model}, {size_mib:.1f} MiB"),
        ("copy (floor)", f"{copy_s:.3f} s"),
        ("python + torch + paddle import", f"{import_s:.2f} s, peak RSS {base_rss:.0f} MiB"),
        ("convert (in process, after imports)", f"{convert_s:.3f} s = {convert_s / copy_s:.1f}x copy  (target <= 3x)"),
        ("convert (whole process)", f"{process_s:.2f} s"),
        ("convert peak RSS", f"{peak_rss:.0f} MiB = baseline + {peak_rss - base_rss:.0f} MiB = baseline + "
                             f"{(peak_rss - base_rss) / size_mib:.2f}x checkpoint  (target <= 2x)"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _timed_copy(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    dst.unlink()
    return elapsed


if __name__ == "__main__":
    main()
