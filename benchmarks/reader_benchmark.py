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

import filecmp
import tempfile
from pathlib import Path

from convert_benchmark import benchmark_arguments, best, checkpoint_and_copy_floor, print_rows, run_child

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
        same = filecmp.cmp(tmp / "reader.pdparams", tmp / "torch.pdparams", shallow=False)

    bests = {label: best(label_runs) for label, label_runs in runs.items()}
    rows = [
        ("checkpoint", f"{args.model}, {size_mib:.1f} MiB"),
        ("copy (floor)", f"{copy_s:.3f} s"),
        ("python + import paddle (floor)", "{:.2f} s, peak RSS {:.0f} MiB".format(*bests["floor"][:2])),
        ("python + import numpy", "{:.2f} s, peak RSS {:.0f} MiB".format(*bests["numpy floor"][:2])),
        ("python + import torch + paddle", "{:.2f} s, peak RSS {:.0f} MiB".format(*bests["floor+torch"][:2])),
    ]
    for label, floors in (("reader", ("floor", "numpy floor")), ("torch", ("floor", "floor+torch"))):
        wall, rss, out = bests[label]
        rows.append((f"convert via {label}", f"{wall:.2f} s, peak RSS {rss:.0f} MiB "
                                              f"({out.strip().splitlines()[-1]})"))
        for floor in floors:
            rows.append((f"  over the {floor}", _over(bests[label], bests[floor], copy_s, size_mib)))
    rows.append(("targets (reader, over the floor)", "<= 3x copy, <= 1.2x checkpoint"))
    rows.append(("outputs byte-identical", str(same)))
    print_rows(rows)


def _over(run: tuple, floor: tuple, copy_s: float, size_mib: float) -> str:
    extra_s, extra_mib = run[0] - floor[0], run[1] - floor[1]
    return (f"{extra_s:+.2f} s = {extra_s / copy_s:.1f}x copy; "
            f"{extra_mib:+.0f} MiB = {extra_mib / size_mib:.2f}x checkpoint")

if __name__ == "__main__":
    main()
