""".pdparams writing: streamed one tensor at a time (untouched tensors copied file to file by
the kernel), yet the opcodes pickle.dump writes and what paddle.load reads back."""
import errno
import io
import os
import pickle
import pickletools

import numpy as np
import paddle
import pytest

from converter.lazy import FileSpan, LazyArray, transposed
from converter.pdparams import write_pdparams


def _arrays():
    rng = np.random.default_rng(0)
    square = rng.standard_normal((6, 6)).astype(np.float32)
    return {
        "c_order": rng.standard_normal((5, 3)).astype(np.float32),
        "fortran": np.asfortranarray(rng.standard_normal((4, 7))),
        "strided": square[:, ::2],
        "scalar": np.array(3, np.int64),
        "empty": np.zeros((0, 3), np.float16),
        "bool": np.array([True, False, True]),
        "uint8": np.arange(7, dtype=np.uint8),
        **{f"many.{i}": rng.standard_normal(i % 5 + 1).astype(np.float32) for i in range(1100)},  # > one SETITEMS batch
    }


def _pickle_dump_without_memo_or_frames(state):
    """pickle.dump's bytes with its memo off, minus the FRAME markers (optional in protocol 4:
    they only let a reader prefetch)."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=4)
    pickler.fast = True
    pickler.dump(state)
    data = buffer.getvalue()
    frames = [pos for op, _, pos in pickletools.genops(data) if op.name == "FRAME"]
    assert frames, "protocol 4 frames its output: the comparison below must remove something"
    kept, last = [], 0
    for pos in frames:
        kept.append(data[last:pos])
        last = pos + 9  # FRAME and its 8-byte length
    return b"".join(kept) + data[last:]


def test_lazy_values_write_the_opcodes_pickle_dump_writes_for_their_arrays():
    state = _arrays()
    written = io.BytesIO()
    write_pdparams({k: LazyArray(lambda v=v: v, v.shape, v.dtype) for k, v in state.items()}, written)
    assert written.getvalue() == _pickle_dump_without_memo_or_frames(state)


def test_lazy_values_are_written_as_their_arrays_and_paddle_loads_them(tmp_path):
    state = _arrays()
    reads = []

    def lazily(key):
        def read():
            reads.append(key)
            return state[key]
        return LazyArray(read, state[key].shape, state[key].dtype)

    lazy = {k: lazily(k) for k in state}
    two_d = [k for k, v in state.items() if v.ndim == 2]
    lazy.update({f"{k}.T": transposed(lazily(k)) for k in two_d})  # one Scratch buffer, reused
    with open(tmp_path / "w.pdparams", "wb") as f:
        write_pdparams(lazy, f)
    assert reads[:3] == ["c_order", "fortran", "strided"]  # read in order, each when its turn comes
    loaded = paddle.load(str(tmp_path / "w.pdparams"), return_numpy=True)
    assert list(loaded) == list(lazy)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and loaded[key].flags.writeable, key
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    for key in two_d:
        np.testing.assert_array_equal(loaded[f"{key}.T"], state[key].T, err_msg=key)
        assert loaded[f"{key}.T"].flags.c_contiguous


def test_a_read_that_fails_stops_the_write():
    def broken():
        raise OSError("disk went away")

    state = {"ok": np.ones(3), "bad": LazyArray(broken, (3,), np.float64), "later": np.ones(3)}
    with pytest.raises(OSError, match="disk went away"):
        write_pdparams(state, io.BytesIO())


# --- file spans: copied by the kernel, checked in the background ---------------------------------------

def _spanned(tmp_path, arrays, check=lambda: None):
    """LazyArrays whose values also lie in a file, saying so with a FileSpan; reading them
    (the fallback) records the key."""
    path = tmp_path / "source.bin"
    path.write_bytes(b"header" + b"".join(a.tobytes() for a in arrays.values()))
    fd = os.open(path, os.O_RDONLY)
    reads, lazy, offset = [], {}, len(b"header")
    for key, array in arrays.items():
        span = FileSpan(fd, offset, array.nbytes, check)
        lazy[key] = LazyArray(lambda k=key, a=array: reads.append(k) or a, array.shape, array.dtype,
                              file_span=lambda s=span: s)
        offset += array.nbytes
    return lazy, reads, fd


def test_spanned_values_are_copied_unread_and_written_as_their_arrays(tmp_path):
    state = {"big": np.arange(100_000, dtype=np.float32).reshape(100, 1000), "small": np.arange(5, dtype=np.int64)}
    lazy, reads, fd = _spanned(tmp_path, state)
    with open(tmp_path / "w.pdparams", "wb") as f:
        write_pdparams(lazy, f)
    os.close(fd)
    assert reads == ["small"]  # the kernel copied the big one; small data is read into the write buffer
    assert (tmp_path / "w.pdparams").read_bytes() == _pickle_dump_without_memo_or_frames(state)


def _refuses(*args):
    raise OSError(errno.EXDEV, "cross-device copy")


def _copies_nothing(*args):
    return 0


@pytest.mark.parametrize("kernel_copy", [_refuses, _copies_nothing])
def test_where_the_kernel_cannot_copy_the_values_are_read_and_written(kernel_copy, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "copy_file_range", kernel_copy)
    state = {"a": np.ones((200, 100), np.float32), "b": np.zeros(40_000, np.float16)}  # 80 kB each: spans
    lazy, reads, fd = _spanned(tmp_path, state)
    with open(tmp_path / "w.pdparams", "wb") as f:
        write_pdparams(lazy, f)
    os.close(fd)
    assert reads == ["a", "b"]
    assert (tmp_path / "w.pdparams").read_bytes() == _pickle_dump_without_memo_or_frames(state)


def test_a_copied_span_that_fails_its_check_fails_the_write(tmp_path):
    def corrupt():
        raise OSError("CRC mismatch")

    lazy, _, fd = _spanned(tmp_path, {"a": np.ones(20_000, np.float32)}, check=corrupt)
    with open(tmp_path / "w.pdparams", "wb") as f, pytest.raises(OSError, match="CRC mismatch"):
        write_pdparams(lazy, f)
    os.close(fd)
