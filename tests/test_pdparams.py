""".pdparams writing: streamed one tensor at a time, yet the same bytes pickle.dump writes and
what paddle.load reads back."""
import io
import pickle

import numpy as np
import paddle
import pytest

from converter.lazy import LazyArray, transposed
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


def _pickle_dump_without_memo(state):
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=4)
    pickler.fast = True
    pickler.dump(state)
    return buffer.getvalue()


def test_lazy_values_write_the_bytes_pickle_dump_writes_for_their_arrays():
    state = _arrays()
    written = io.BytesIO()
    write_pdparams({k: LazyArray(lambda v=v: v, v.shape, v.dtype) for k, v in state.items()}, written)
    assert written.getvalue() == _pickle_dump_without_memo(state)


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
