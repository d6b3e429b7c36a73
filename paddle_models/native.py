"""torch2paddle's compiled CPU kernels, for dygraph forwards where Paddle 3.3's own CPU kernels are slow.

``kernels/depthwise_conv2d.cc``: a depthwise conv (odd k x k, stride 1, 'same' zero padding), which
Paddle runs on CPU as one tiny im2col + GEMM per channel.  ``kernels/gelu.cc``: the exact GELU.
``kernels/statistics.cc``: ``numerics.GroupNorm``'s forward and ``numerics.mean``'s corrected row
mean, the same float32 statistics in one pass each where Paddle's ops take ~15, and RegionViT's
LayerNorm2d (over an NCHW map's channels, its statistics from double sums).  ``kernels/bias.cc``: a
conv's bias and a Linear's added in place, where Paddle's broadcast add is ~3x / ~9x slower.
``kernels/permute.cc``: a dense permutation that keeps the last axis, one copy per row on every
thread (einsum's runs one).  ``kernels/softmax.cc``: the softmax over the last axis, each output
rounded once from double precision.  ``kernels/routing.cc``: BiFormer's routing, the gather of the
routed regions' blocks and the region means (in double, without a float64 copy).  Each computes
what the ports computed with Paddle's ops, within float32 rounding and at least as close to float64
(the bias adds, the permutation and the gather: bit for bit; tests/test_native.py); times and
errors per shape: ``benchmarks/kernel_benchmark.py``.

They are compiled on first use (~15 s, with the gcc that Paddle's ``cpp_extension`` calls) into one
library in a cache keyed by their sources, the flags, Paddle's version, Python's and the CPU's
features, shared between processes (a file lock; the library is moved into place whole), and
loaded with Paddle's custom-operator loader (``load_op_meta_info_and_register_op``; called through
``_C_ops._run_custom_op``, as the modules Paddle generates for custom ops call them).  Where they
cannot be built or loaded (no compiler, no glibc vector maths, another platform) or
``TORCH2PADDLE_NATIVE=0`` is set, the models run Paddle's own kernels (one warning says why): the
same results within float32 rounding, slower.  Used only in dygraph calls that record no gradient
(no backward is registered) and never in a traced graph: an exported model holds only Paddle's
ops, so Paddle Inference runs it without this library.  Every kernel but the row mean splits its
work among ``threads()`` threads (Paddle's own count: OMP_NUM_THREADS, else the one thread Paddle
caps itself at; ``set_threads`` follows ``paddle.base.core.set_num_threads``), each output computed
as with one thread, so the values do not depend on the count (fcvit_b12's dygraph forward at two
threads: 97 -> 70 ms at batch 1, 764 -> 495 at batch 8, when the conv, GELU and bias kernels took
threads).
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import paddle

KERNEL_SOURCES = sorted((Path(__file__).with_name("kernels")).glob("*.cc"))
OPS = ("t2p_depthwise_conv2d", "t2p_gelu", "t2p_row_mean", "t2p_group_norm", "t2p_add_channel_bias",
       "t2p_add_row_bias", "t2p_permute", "t2p_softmax", "t2p_gather_blocks", "t2p_axis_mean",
       "t2p_channel_layer_norm", "t2p_gelu_")
# -mprefer-vector-width=512: gcc's tuning for Intel's AVX-512 CPUs keeps to 256-bit vectors (AMD's Zen 4
# already takes 512); on a Rocket Lake class Xeon the 512-bit kernels run the 11x11 depthwise conv
# 1.4-1.5x faster ([8, 64, 56, 56]: 17.8 -> 11.8 ms) and fcvit_b12's dygraph forward ~10% faster.
# Without AVX-512 the flag changes nothing.
# The thread split runs on the OpenMP runtime Paddle ships and MKL runs on (Intel's libiomp5, which
# takes gcc's OpenMP calls): on gcc's own libgomp, its idle threads spin against MKL's and fcvit_b12's
# dygraph forward at two threads took 249 ms instead of 97 (70 with libiomp5).  A Paddle without it
# gets the serial kernels (-fopenmp-simd: gelu.cc's vector exp only).
_PADDLE_LIBS = Path(paddle.__file__).parent / "libs"
_THREADED = (_PADDLE_LIBS / "libiomp5.so").is_file()
COMPILER_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp" if _THREADED else "-fopenmp-simd"]
LINKER_FLAGS = ["-lmvec"] + ([f"-L{_PADDLE_LIBS}", "-liomp5", f"-Wl,-rpath,{_PADDLE_LIBS}"] if _THREADED else [])
DISABLE_VARIABLE = "TORCH2PADDLE_NATIVE"


_threads = None  # set_threads's count; None: Paddle's default, read from OMP_NUM_THREADS


def threads() -> int:
    """The threads the kernels split their work among: as many as Paddle's math library uses."""
    if _threads is not None:
        return _threads
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1


def set_threads(count: int) -> None:
    """Give the kernels ``count`` threads (called beside ``paddle.base.core.set_num_threads``)."""
    global _threads
    _threads = max(1, int(count))


def cache_dir() -> Path:
    """Where built kernels are kept: ``$TORCH2PADDLE_CACHE`` or ``$XDG_CACHE_HOME/torch2paddle``."""
    root = (os.environ.get("TORCH2PADDLE_CACHE")
            or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch2paddle")
    return Path(root) / "kernels"


def _cpu_features() -> str:
    """The CPU's feature flags (``-march=native`` compiles for them), so a cache shared between
    machines never hands one a library built for another."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_key() -> str:
    """Everything the built library depends on, hashed."""
    parts = [*(source.read_bytes() for source in KERNEL_SOURCES), " ".join(COMPILER_FLAGS + LINKER_FLAGS).encode(),
             paddle.__version__.encode(), sys.version.encode(), platform.machine().encode(), _cpu_features().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


_BUILD_SCRIPT = """
import json, sys
from paddle.utils.cpp_extension import load
load(**json.loads(sys.argv[1]))
"""


def _build(library: Path) -> None:
    """Compile the kernels into ``library`` (in a child process: Paddle's build prints to the
    terminal, and its import of the result would register the op under a temporary path)."""
    name = library.stem
    with tempfile.TemporaryDirectory(dir=library.parent, prefix=".build-") as work:
        arguments = dict(name=name, sources=[str(source) for source in KERNEL_SOURCES], build_directory=work,
                         extra_cxx_cflags=COMPILER_FLAGS, extra_ldflags=LINKER_FLAGS)
        done = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, json.dumps(arguments)],
                              capture_output=True, text=True)
        built = Path(work) / name / f"{name}.so"
        if done.returncode != 0 or not built.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"the build failed ({tail[0]})")
        os.replace(built, library)  # whole or not at all: another process may be waiting to load it


def _library() -> Path:
    """The built library, compiled first if no process has yet (one at a time: a file lock)."""
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"t2p_native_{build_key()}.so"
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not library.is_file():
            _build(library)
    return library


@functools.cache
def native_kernels_available() -> bool:
    """Whether the compiled kernels are loaded into this process (built first if need be).  False,
    with one warning saying why, where they cannot be; False without one under TORCH2PADDLE_NATIVE=0."""
    if os.environ.get(DISABLE_VARIABLE, "1") == "0":
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        from paddle.utils.cpp_extension.extension_utils import load_op_meta_info_and_register_op
        registered = load_op_meta_info_and_register_op(str(_library()))
        if set(OPS) - set(registered):
            raise RuntimeError(f"the library registers {registered}, not {list(OPS)}")
    except Exception as error:  # any failure leaves Paddle's own kernels in use, never a broken model
        warnings.warn(f"torch2paddle: compiled CPU kernels unavailable, Paddle's own are used (slower): {error}",
                      RuntimeWarning, stacklevel=2)
        return False
    return True


def records_gradient(x, *parameters) -> bool:
    """Whether a call on ``x`` (with a layer's ``parameters``) is recorded for a backward pass."""
    return paddle.is_grad_enabled() and not (x.stop_gradient and all(p.stop_gradient for p in parameters))


def runs_natively(x, *parameters) -> bool:
    """Whether a dygraph call on ``x`` (with the layer's ``parameters``) may run a compiled kernel: a
    float32 CPU tensor, nothing recorded for a backward (the kernels have none), the kernels built."""
    return (paddle.in_dynamic_mode() and x.dtype == paddle.float32 and x.place.is_cpu_place()
            and not records_gradient(x, *parameters) and native_kernels_available())


def _run(op: str, *inputs):
    """The compiled ``op`` on ``inputs`` (loaded into this process first if need be), tensors made
    contiguous first: the kernels read them as flat arrays."""
    if not native_kernels_available():
        raise RuntimeError(f"{op}: torch2paddle's compiled kernels are not available in this process")
    inputs = [value.contiguous() if isinstance(value, paddle.Tensor) and not value.is_contiguous() else value
              for value in inputs]
    return paddle._C_ops._run_custom_op(op, *inputs)[0]


def native_depthwise_conv2d(x, weight, bias=None):
    """``F.conv2d(x, weight, bias, padding=k // 2, groups=C)`` for an odd k x k depthwise ``weight``
    [C, 1, k, k], stride 1, by the compiled kernel: float32 CPU tensors, no gradient (where
    ``native_kernels_available()``)."""
    return _run("t2p_depthwise_conv2d", x, weight, bias, threads())


def native_add_channel_bias(x, bias):
    """``x + bias.reshape([C, 1, 1])`` for ``x`` [N, C, ...], written into ``x`` (bit for bit the same
    sums), by the compiled kernel: float32 CPU tensors, no gradient.  ``x`` must be a fresh output
    that nothing else reads (``layers.add_into``'s contract)."""
    return _run("t2p_add_channel_bias", x, bias, threads())


def native_add_row_bias(x, bias):
    """``x + bias`` for ``x`` [..., C] and ``bias`` [C], written into ``x`` (bit for bit the same sums),
    by the compiled kernel: float32 CPU tensors, no gradient.  ``x`` must be a fresh output that
    nothing else reads (``layers.add_into``'s contract)."""
    return _run("t2p_add_row_bias", x, bias, threads())


def native_permute(x, perm):
    """``x.transpose(perm)`` written densely, for a ``perm`` that keeps the last axis last, by the
    compiled kernel: a float32 CPU tensor, no gradient."""
    return _run("t2p_permute", x, [int(axis) for axis in perm], threads())


def native_softmax(x):
    """``F.softmax(x, axis=-1)`` by the compiled kernel (exponentials, sums and quotients in double,
    each output rounded once): a float32 CPU tensor, no gradient."""
    return _run("t2p_softmax", x, threads())


def native_gather_blocks(x, index):
    """``paddle.gather(x, index, axis=1)`` for ``x`` [M, R, ...] and an int64 ``index`` [J], by the
    compiled kernel (one copy per block, the blocks split among threads): float32 CPU, no gradient."""
    return _run("t2p_gather_blocks", x, index, threads())


def native_axis_mean(x, axis: int):
    """``x.mean(axis)`` for one axis, summed and divided in double and rounded once (as the float64
    mean numerics.mean takes for a non-trailing axis), by the compiled kernel: float32 CPU, no
    gradient.  The result drops ``axis``."""
    shape = list(x.shape)
    axis %= len(shape)
    out = _run("t2p_axis_mean", x, math.prod(shape[:axis]), shape[axis], threads())
    return out.reshape(shape[:axis] + shape[axis + 1:])


def native_gelu(x, in_place: bool = False):
    """``F.gelu(x)`` (exact, erf form) by the compiled kernel: a float32 CPU tensor, no gradient.
    ``in_place``: written into ``x``, which must be a fresh output that nothing else reads
    (``layers.add_into``'s contract)."""
    return _run("t2p_gelu_" if in_place else "t2p_gelu", x, threads())


def native_row_mean(rows):
    """Each row's mean of ``rows`` [M, n], keepdim [M, 1], as ``numerics._row_mean`` forms it
    (pairwise, then corrected once), by the compiled kernel: float32 CPU, no gradient."""
    return _run("t2p_row_mean", rows)


def native_group_norm(x, weight, bias, groups: int, epsilon: float):
    """``numerics.GroupNorm``'s forward (corrected mean, biased variance of the centred values,
    ((x - mean) * inv_std) * weight + bias) by the compiled kernel: float32 CPU, no gradient."""
    return _run("t2p_group_norm", x, weight, bias, int(groups), float(epsilon), threads())


def native_channel_layer_norm(x, weight, bias, epsilon: float):
    """RegionViT's LayerNorm2d: ((x - mean) / sqrt(var + eps)) * weight + bias over the channels of
    ``x`` [B, C, ...] at every position, its mean and biased variance summed in double and rounded
    once, by the compiled kernel: float32 CPU, no gradient."""
    return _run("t2p_channel_layer_norm", x, weight, bias, float(epsilon), threads())
