"""Convert wall time and peak memory against two floors measured in the same run.

    python benchmarks/convert_benchmark.py [--model fcvit_b48] [--repeat 3]

Floors: a plain copy of the checkpoint file (time), and a process that only imports the
frameworks (memory).  Targets from issue 2: convert <= 3x the copy time; peak RSS <= the
import baseline + 2x the checkpoint size.  Each measurement runs in a fresh process whose peak
RSS is its own high-water mark (see run_child); times are the best of --repeat.
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


# The child records its own peak RSS (VmHWM, Linux) at exit.  The child's ru_maxrss is no
# use: it also counts the parent's resident memory, which the child shares from spawn to exec.
RECORD_PEAK = """import atexit, os
def _record_peak(path=os.environ["T2P_PEAK_FILE"]):
    with open("/proc/self/status") as status, open(path, "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM")))
atexit.register(_record_peak)
"""


def run_child(code: str, *args) -> tuple:
    """(stdout, wall seconds, peak RSS in MiB) of a fresh Python process."""
    os.sync()  # see timed_copy
    with tempfile.NamedTemporaryFile("r", suffix=".peak") as peak:
        env = dict(os.environ, PYTHONPATH=str(ROOT), GLOG_minloglevel="2", T2P_PEAK_FILE=peak.name)
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", RECORD_PEAK + code, *map(str, args)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
        out = proc.stdout.read()
        status = proc.wait()
        wall = time.perf_counter() - start
        if status != 0:
            raise SystemExit(f"child failed: {code[:40]!r}")
        return out, wall, int(peak.read()) / 1024


def best(runs) -> tuple:
    """(best wall seconds, worst peak RSS MiB, last stdout) of run_child results."""
    return min(w for _, w, _ in runs), max(r for _, _, r in runs), runs[-1][0]


def print_rows(rows) -> None:
    """(label, value) rows as two aligned columns."""
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def benchmark_arguments(doc: str, default_model: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default=default_model)
    parser.add_argument("--repeat", type=int, default=3)
    return parser.parse_args()


def checkpoint_and_copy_floor(model: str, tmp: Path, repeat: int) -> tuple:
    """A seeded official-format checkpoint of ``model`` in ``tmp``: (path, size in MiB, best
    time of ``repeat`` plain copies)."""
    sys.path.insert(0, str(ROOT))
    from converter.fixtures import make_official_checkpoint

    src = make_official_checkpoint(model, tmp / f"{model}.pth")
    return src, src.stat().st_size / 2**20, min(timed_copy(src, tmp / "copy.pth") for _ in range(repeat))


def main():
    args = benchmark_arguments(__doc__, "fcvit_b48")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src, size_mib, copy_s = checkpoint_and_copy_floor(args.model, tmp, args.repeat)
        baseline = [run_child(IMPORT_ONLY) for _ in range(args.repeat)]
        runs = []
        for _ in range(args.repeat):
            # Like the copy floor, each run writes after the previous output is gone (replacing a
            # file frees its page cache inside the rename: 0.05 s for this one).
            (tmp / "out.pdparams").unlink(missing_ok=True)
            runs.append(run_child(CONVERT, args.model, src, tmp / "out.pdparams"))

    import_s, base_rss, _ = best(baseline)
    convert_s = min(float(out.strip().splitlines()[-1]) for out, _, _ in runs)
    process_s, peak_rss, _ = best(runs)
    rows = [
        ("checkpoint", f"{args.model}, {size_mib:.1f} MiB"),
        ("copy (floor)", f"{copy_s:.3f} s"),
        ("python + torch + paddle import", f"{import_s:.2f} s, peak RSS {base_rss:.0f} MiB"),
        ("convert (in process, after imports)", f"{convert_s:.3f} s = {convert_s / copy_s:.1f}x copy  (target <= 3x)"),
        ("convert (whole process)", f"{process_s:.2f} s"),
        ("convert peak RSS", f"{peak_rss:.0f} MiB = baseline + {peak_rss - base_rss:.0f} MiB = baseline + "
                             f"{(peak_rss - base_rss) / size_mib:.2f}x checkpoint  (target <= 2x)"),
    ]
    print_rows(rows)


def timed_copy(src: Path, dst: Path) -> float:
    # Every measurement starts with no dirty pages pending: while the kernel writes back earlier
    # output (say, the previous run's), writing runs at a tenth of its speed on these machines.
    os.sync()
    start = time.perf_counter()
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    dst.unlink()
    return elapsed


if __name__ == "__main__":
    main()
