"""Convert through the torch-free reader and through torch.load, against two floors measured
in the same run.

    python benchmarks/reader_benchmark.py [--model crossformer_pp_huge] [--repeat 3]

Floors: a process that only starts Python and imports Paddle (wall time, peak RSS), and a
plain copy of the checkpoint file (fsync'd).  Targets (issue 8), for the reader:
(convert process - import floor) <= 3x the copy time; peak RSS <= the floor's + 1.2x the file.
convert needs no Paddle at all (the Paddle layouts are recorded, converter.layouts), so it
is also measured over a lower floor: a process that starts Python and imports numpy.
Both converts run the real CLI in a fresh process (``torch2paddle convert``; the torch one with
``--unsafe-pickle``, i.e. torch.load with mmap feeding the same conversion and writer), so the
two differ only in how the file is read.  Times are the best of --repeat, RSS the worst.
"""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from convert_benchmark import benchmark_arguments, checkpoint_and_copy_floor, run_child

IMPORT_NUMPY = "import numpy"
IMPORT_PADDLE = "import paddle"
IMPORT_TORCH_AND_PADDLE = "import torch, paddle"
CONVERT = """
import sys, warnings
warnings.simplefilter("ignore")
from converter.cli import main
main(sys.argv[1:])
print("torch imported:", "torch" in sys.modules, "/ paddle imported:", "paddle" in sys.modules)
"""


def best(runs) -> tuple:
    """(best wall seconds, worst peak RSS MiB, last stdout) of run_child results."""
    return min(w for _, w, _ in runs), max(r for _, _, r in runs), runs[-1][0]


def main():
    args = benchmark_arguments(__doc__, "crossformer_pp_huge")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src, size_mib, copy_s = checkpoint_and_copy_floor(args.model, tmp, args.repeat)
        runs = {}
        for _ in range(args.repeat):  # interleaved, so load drifts hit every kind alike
            for label, code, argv in [
                ("floor", IMPORT_PADDLE, ()),
                ("numpy floor", IMPORT_NUMPY, ()),
                ("floor+torch", IMPORT_TORCH_AND_PADDLE, ()),
                ("reader", CONVERT, ("convert", args.model, src, tmp / "reader.pdparams")),
                ("torch", CONVERT, ("convert", args.model, src, tmp / "torch.pdparams", "--unsafe-pickle")),
            ]:
                # Like the copy floor, each run writes after the previous output is gone: writing
                # while it still holds its page cache costs measurably more.
                (tmp / f"{label}.pdparams").unlink(missing_ok=True)
                runs.setdefault(label, []).append(run_child(code, *argv))
        same = _sha(tmp / "reader.pdparams") == _sha(tmp / "torch.pdparams")

    floor_s, floor_rss, _ = best(runs["floor"])
    rows = [
        ("checkpoint", f"{args.model}, {size_mib:.1f} MiB"),
        ("copy (floor)", f"{copy_s:.3f} s"),
        ("python + import paddle (floor)", f"{floor_s:.2f} s, peak RSS {floor_rss:.0f} MiB"),
        ("python + import numpy", "{:.2f} s, peak RSS {:.0f} MiB".format(*best(runs["numpy floor"])[:2])),
        ("python + import torch + paddle", "{:.2f} s, peak RSS {:.0f} MiB".format(*best(runs["floor+torch"])[:2])),
    ]
    for label, floors in (("reader", ("floor", "numpy floor")), ("torch", ("floor", "floor+torch"))):
        wall, rss, out = best(runs[label])
        rows.append((f"convert via {label}", f"{wall:.2f} s, peak RSS {rss:.0f} MiB "
                                              f"({out.strip().splitlines()[-1]})"))
        for floor in floors:
            rows.append((f"  over the {floor}", _over(best(runs[label]), best(runs[floor]), copy_s, size_mib)))
    rows.append(("targets (reader, over the floor)", "<= 3x copy, <= 1.2x checkpoint"))
    rows.append(("outputs byte-identical", str(same)))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _over(run: tuple, floor: tuple, copy_s: float, size_mib: float) -> str:
    extra_s, extra_mib = run[0] - floor[0], run[1] - floor[1]
    return (f"{extra_s:+.2f} s = {extra_s / copy_s:.1f}x copy; "
            f"{extra_mib:+.0f} MiB = {extra_mib / size_mib:.2f}x checkpoint")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    main()
