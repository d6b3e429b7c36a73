"""torch2paddle's compiled CPU kernels (paddle_models/native.py, paddle_models/kernels/) against
Paddle's own ops and a float64 computation: the depthwise conv on every map and kernel size the
models use (3x3, 5x5, 11x11; classification, dense and odd maps, maps smaller than the kernel), the
exact GELU, the softmax, GroupNorm, RegionViT's channel LayerNorm, the corrected row mean, the
in-place bias adds, the dense permutation and BiFormer's routing (gather, region means); which
calls take them (dygraph, nothing recorded for a backward; never training, never a traced graph);
and what happens where they cannot be built."""
import subprocess
import sys
import warnings

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddle_models import native, numerics
from paddle_models.depthwise import DepthwiseConv2D
from paddle_models.layers import GELU, Conv2D, Linear, permute, softmax

REL_TOL = 2e-6  # relative to the largest output: float32 noise, as tests/test_depthwise.py


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def test_kernels_are_built_here():
    # the fast path is what this suite's parity tests exercise; a build that silently fell back to
    # Paddle's kernels would leave them proving the slow path only
    assert native.native_kernels_available()


DEPTHWISE_CASES = [  # (batch, channels, H, W, kernel)
    (2, 256, 56, 56, 3), (2, 512, 28, 28, 3), (2, 1280, 14, 14, 3), (2, 2048, 7, 7, 3),  # FCViT's channel mixer
    (2, 64, 56, 56, 5), (2, 512, 7, 7, 5), (2, 64, 56, 56, 3), (1, 128, 64, 88, 3),      # BiFormer's LePE / pos-embed
    (2, 64, 56, 56, 11), (2, 128, 28, 28, 11), (2, 320, 14, 14, 11), (2, 512, 7, 7, 11),  # FCViT's token mixer
    (1, 64, 64, 88, 11), (1, 512, 12, 16, 11), (1, 256, 48, 64, 3),                      # dense sizes
    (2, 32, 57, 57, 11), (1, 16, 13, 19, 5), (1, 8, 1, 1, 3), (1, 8, 3, 5, 11),           # odd, tiny,
    (3, 16, 6, 17, 7), (1, 4, 1, 9, 5), (1, 4, 9, 1, 3),                                  # smaller than k
    (2, 40, 9, 11, 7), (1, 24, 5, 5, 11),                                                 # a part group of 16
]


@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=lambda c: "x".join(map(str, c)))
def test_depthwise_conv2d_equals_paddle_conv(case):
    b, c, h, w, k = case
    rng = np.random.default_rng(h * 1000 + w + k)
    x = rng.standard_normal((b, c, h, w))
    weight = rng.standard_normal((c, 1, k, k)) / k
    bias = rng.standard_normal(c)
    exact = F.conv2d(*map(paddle.to_tensor, (x, weight, bias)), padding=k // 2, groups=c).numpy()
    x32, w32, b32 = (paddle.to_tensor(a.astype(np.float32)) for a in (x, weight, bias))
    paddle_conv = F.conv2d(x32, w32, b32, padding=k // 2, groups=c).numpy()
    with paddle.no_grad():
        ours = native.native_depthwise_conv2d(x32, w32, b32).numpy()
        unbiased = native.native_depthwise_conv2d(x32, w32).numpy()
    assert ours.shape == exact.shape
    assert _rel(ours, paddle_conv) <= REL_TOL
    # as close to a float64 conv as Paddle's float32 conv is (its rows summed first: closer at 11x11)
    assert _rel(ours, exact) <= max(1.5 * _rel(paddle_conv, exact), 2e-7), (_rel(ours, exact), _rel(paddle_conv, exact))
    assert np.array_equal(unbiased + b32.numpy().reshape(c, 1, 1), ours)  # the bias added last, as Paddle's conv + add


def test_depthwise_conv2d_reads_a_strided_view():
    x = paddle.randn([2, 9, 8, 16]).transpose([0, 1, 3, 2])  # a view, not contiguous
    weight = paddle.randn([9, 1, 3, 3])
    with paddle.no_grad():
        assert _rel(native.native_depthwise_conv2d(x, weight).numpy(),
                    F.conv2d(x, weight, padding=1, groups=9).numpy()) <= REL_TOL


@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0, 30.0])
def test_gelu_equals_paddle_gelu_and_is_as_close_to_float64(scale):
    from math import erf, sqrt
    rng = np.random.default_rng(int(scale * 10))
    x = (rng.standard_normal(200_003) * scale).astype(np.float32)  # odd length: the vector loop's tail
    x[:4] = [0.0, -0.0, 1e-30, -40.0]
    exact = np.array([v * 0.5 * (1.0 + erf(v / sqrt(2.0))) for v in x.astype(np.float64)])
    paddle_gelu = F.gelu(paddle.to_tensor(x)).numpy()
    with paddle.no_grad():
        ours = native.native_gelu(paddle.to_tensor(x)).numpy()
    assert _rel(ours, paddle_gelu) <= REL_TOL
    assert np.abs(ours - exact).max() <= max(1.5 * np.abs(paddle_gelu - exact).max(), 1e-12)
    assert np.abs(ours - exact).mean() <= np.abs(paddle_gelu - exact).mean()


def test_gelu_keeps_its_relative_precision_in_the_negative_tail():
    # GELU(x) for x < 0 is x / 2 * erfc(|x| / sqrt(2)): computed as such, not as 1 + erf(x / sqrt(2)),
    # which cancels (Paddle's and torch's give 0 below about -5.2); the error left is x / sqrt(2)'s
    # rounding, amplified by erfc's slope (~1e-5 relative at x = -13, where GELU leaves the normal range)
    from math import erfc, sqrt
    x = -np.geomspace(0.6, 13.1, 20_001).astype(np.float32)
    exact = np.array([v * 0.5 * erfc(-v / sqrt(2.0)) for v in x.astype(np.float64)])
    with paddle.no_grad():
        ours = native.native_gelu(paddle.to_tensor(x)).numpy()
    relative = np.abs(ours / exact - 1)
    assert relative.max() <= 2e-5 and relative[x > -4].max() <= 1e-6, (relative.max(), relative[x > -4].max())


def test_gelu_in_place_writes_the_same_values_into_its_input():
    x = paddle.to_tensor((np.random.default_rng(9).standard_normal((3, 7, 11, 13)) * 3).astype(np.float32))
    layer = GELU(in_place=True)
    with paddle.no_grad():
        expected = native.native_gelu(x).numpy()
        out = layer(x)
    assert np.array_equal(out.numpy(), expected)
    assert np.array_equal(x.numpy(), expected)  # written into x: no new tensor
    trainable = paddle.to_tensor(np.linspace(-3, 3, 12, dtype=np.float32))
    trainable.stop_gradient = False
    before = trainable.numpy().copy()
    assert np.array_equal(layer(trainable).numpy(), F.gelu(trainable).numpy())  # recording: Paddle's
    assert np.array_equal(trainable.numpy(), before)


def test_gelu_writes_no_subnormal_values():
    # GELU(x) for x below about -13 (and x within 2e-38 of 0) is below float32's normal range: the
    # kernel gives a zero of x's sign, as Paddle's GELU does, not a subnormal, which would slow every
    # multiply-add that reads it; everywhere else it is unchanged (the test above)
    x = np.concatenate([-np.geomspace(12.0, 40.0, 5001), np.geomspace(1e-45, 1e-36, 101),
                        -np.geomspace(1e-45, 1e-36, 101), [0.0, -0.0, 13.5]]).astype(np.float32)
    with paddle.no_grad():
        ours = native.native_gelu(paddle.to_tensor(x)).numpy()
    magnitude = np.abs(ours)
    assert not np.any((magnitude > 0) & (magnitude < np.finfo(np.float32).tiny))
    assert np.array_equal(np.signbit(ours[magnitude == 0]), np.signbit(x[magnitude == 0]))
    assert ours[-1] == np.float32(13.5) and np.all(ours[:250] < 0)  # -12 to -12.8: still normal


GROUP_NORM_CASES = [  # (shape, groups): FCViT's one-group norms at 224 and a dense size, odd and grouped ones
    ((2, 64, 56, 56), 1), ((2, 512, 7, 7), 1), ((1, 320, 16, 22), 1), ((2, 6, 5, 3), 3), ((3, 8, 1, 1), 2),
    ((2, 12, 7), 4),
]


@pytest.mark.parametrize("shape,groups", GROUP_NORM_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"g{v}")
def test_group_norm_equals_the_float32_statistics(shape, groups):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape) * 2.0 + 3.0  # a mean large against the spread: what the correction is for
    weight, bias = rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    rows = x.reshape(shape[0] * groups, -1)
    centred = rows - rows.mean(axis=1, keepdims=True)
    normalized = (centred / np.sqrt((centred ** 2).mean(axis=1, keepdims=True) + 1e-5)).reshape(shape)
    affine_shape = (1, shape[1]) + (1,) * (len(shape) - 2)
    exact = normalized * weight.reshape(affine_shape) + bias.reshape(affine_shape)
    layer = numerics.GroupNorm(groups, shape[1])
    layer.weight.set_value(weight.astype(np.float32))
    layer.bias.set_value(bias.astype(np.float32))
    x32 = paddle.to_tensor(x.astype(np.float32))
    recorded = layer(x32).numpy()  # recording gradients: Paddle's ops (numerics._NormalizeRows)
    with paddle.no_grad():
        ours = layer(x32).numpy()
        assert np.array_equal(ours, native.native_group_norm(x32, layer.weight, layer.bias, groups, 1e-5).numpy())
    assert _rel(ours, recorded) <= REL_TOL
    assert _rel(ours, exact) <= max(1.5 * _rel(recorded, exact), 2e-7), (_rel(ours, exact), _rel(recorded, exact))


@pytest.mark.parametrize("shape", [(8, 3136), (4, 200704), (3, 49), (2, 1), (5, 257)])
def test_row_mean_within_rounding_of_the_exact_mean(shape):
    rng = np.random.default_rng(shape[1])
    rows = (rng.standard_normal(shape) + 2.0).astype(np.float32)
    exact = rows.astype(np.float64).mean(axis=1, keepdims=True)
    with paddle.no_grad():
        ours = native.native_row_mean(paddle.to_tensor(rows)).numpy()
    assert ours.shape == exact.shape
    assert np.abs(ours - exact).max() <= np.abs(exact).max() * 2 ** -23  # within one rounding (ulp at most)
    paddle_ops = numerics._row_mean(paddle.to_tensor(rows), shape[1]).numpy()  # the same mean by Paddle's ops
    assert np.abs(ours - paddle_ops).max() <= np.abs(exact).max() * 2 ** -22


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (1, 3, 1, 1), (2, 7, 13), (3, 64, 56, 57)], ids=str)
def test_channel_bias_is_added_in_place_bit_for_bit(shape):
    rng = np.random.default_rng(sum(shape))
    x = paddle.to_tensor(rng.standard_normal(shape).astype(np.float32))
    bias = paddle.to_tensor(rng.standard_normal(shape[1]).astype(np.float32))
    expected = (x + bias.reshape([-1] + [1] * (len(shape) - 2))).numpy()
    with paddle.no_grad():
        ours = native.native_add_channel_bias(x, bias)
    assert np.array_equal(ours.numpy(), expected)
    assert np.array_equal(x.numpy(), expected)  # written into x: no new tensor


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (1, 1), (7, 13), (2, 49, 3, 96), (8, 3, 385)], ids=str)
def test_row_bias_is_added_in_place_bit_for_bit(shape):
    rng = np.random.default_rng(sum(shape) + 1)
    x = paddle.to_tensor(rng.standard_normal(shape).astype(np.float32))
    bias = paddle.to_tensor(rng.standard_normal(shape[-1]).astype(np.float32))
    expected = (x + bias).numpy()
    with paddle.no_grad():
        ours = native.native_add_row_bias(x, bias)
    assert np.array_equal(ours.numpy(), expected)
    assert np.array_equal(x.numpy(), expected)  # written into x: no new tensor


PERMUTE_CASES = [  # (shape, perm): attention's head split and merge, window partition, size-1 and merged axes
    ((6, 49, 3, 3, 32), (2, 0, 3, 1, 4)), ((6, 3, 49, 32), (0, 2, 1, 3)), ((2, 3, 7, 4, 7, 16), (0, 1, 3, 2, 4, 5)),
    ((2, 1, 5, 1, 3), (3, 2, 1, 0, 4)), ((4, 5, 6, 7), (0, 1, 2, 3)), ((4, 5, 6, 7), (1, 0, 2, 3)), ((9,), (0,)),
    ((3, 0, 4), (1, 0, 2)), ((5, 3, 2, 8), (2, 1, 0, 3)),
]


@pytest.mark.parametrize("case", PERMUTE_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("threads", [1, 3])
def test_permute_writes_the_transpose_densely(case, threads, monkeypatch):
    shape, perm = case
    monkeypatch.setattr(native, "_threads", threads)
    x = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)
    with paddle.no_grad():
        ours = native.native_permute(paddle.to_tensor(x), perm)
    assert ours.shape == [shape[a] for a in perm]
    assert np.array_equal(ours.numpy(), np.transpose(x, perm))


def test_layers_permute_takes_the_kernel_only_for_a_kept_last_axis_with_nothing_recorded(monkeypatch):
    calls = []
    kernel = native.native_permute
    monkeypatch.setattr(native, "native_permute", lambda x, p: calls.append(tuple(p)) or kernel(x, p))
    x = paddle.randn([2, 3, 4, 5])
    with paddle.no_grad():
        assert np.array_equal(permute(x, [1, 0, 2, 3]).numpy(), np.transpose(x.numpy(), [1, 0, 2, 3]))
        assert np.array_equal(permute(x, [0, 3, 1, 2]).numpy(), np.transpose(x.numpy(), [0, 3, 1, 2]))
    assert calls == [(1, 0, 2, 3)]  # the last axis moved: einsum's
    trainable = x.clone()
    trainable.stop_gradient = False
    assert np.array_equal(permute(trainable, [1, 0, 2, 3]).numpy(), np.transpose(x.numpy(), [1, 0, 2, 3]))
    assert calls == [(1, 0, 2, 3)]  # recording a gradient: einsum's


@pytest.mark.parametrize("shape", [(16, 3, 49, 49), (8, 2, 64, 64), (4, 3, 7, 197), (5, 1), (3, 0)], ids=str)
@pytest.mark.parametrize("threads", [1, 3])
def test_softmax_is_correctly_rounded_and_equals_paddles_within_float32_noise(shape, threads, monkeypatch):
    monkeypatch.setattr(native, "_threads", threads)
    x = (np.random.default_rng(sum(shape)).standard_normal(shape) * 4.0).astype(np.float32)
    x64 = x.astype(np.float64)
    exps = np.exp(x64 - x64.max(-1, keepdims=True, initial=-np.inf))
    exact = exps / exps.sum(-1, keepdims=True)
    with paddle.no_grad():
        ours = native.native_softmax(paddle.to_tensor(x)).numpy()
        paddles = F.softmax(paddle.to_tensor(x), axis=-1).numpy()
    assert ours.shape == shape
    if x.size:
        assert np.abs(ours - exact).max() <= 0.6 * np.spacing(exact.astype(np.float32)).max()  # rounded once
        assert np.all(np.abs(ours - exact) <= np.abs(paddles - exact) + np.spacing(np.float32(exact)))
        assert np.abs(ours - paddles).max() <= 1e-6


def test_softmax_of_masked_and_extreme_rows():
    x = np.array([[0.0, -np.inf, 1.0, -100.0], [80.0, 80.0, -80.0, 0.0], [-np.inf] * 4], dtype=np.float32)
    with paddle.no_grad():
        ours = native.native_softmax(paddle.to_tensor(x)).numpy()
        paddles = F.softmax(paddle.to_tensor(x), axis=-1).numpy()
    # Paddle floors exp(x - max) at exp(-64); the kernel's exact values below float32's normal range
    # (-inf, a -100 mask) are written as 0, never as subnormals (which slow the next matmul ~100x)
    assert np.allclose(ours[:2], paddles[:2], rtol=1e-6, atol=1e-27)
    assert ours[0, 1] == ours[0, 3] == ours[1, 2] == 0.0 and ours[1, 3] > 0.0
    assert np.isnan(ours[2]).all() and np.isnan(paddles[2]).all()  # nothing to normalise: as Paddle's


def test_layers_softmax_takes_the_kernel_only_where_nothing_is_recorded(monkeypatch):
    calls = []
    kernel = native.native_softmax
    monkeypatch.setattr(native, "native_softmax", lambda x: calls.append(1) or kernel(x))
    x = paddle.randn([2, 3, 5, 5])
    with paddle.no_grad():
        softmax(x)
    assert calls == [1]
    trainable = x.clone()
    trainable.stop_gradient = False
    assert np.array_equal(softmax(trainable).numpy(), F.softmax(trainable, axis=-1).numpy()) and calls == [1]
    static = paddle.jit.to_static(softmax, input_spec=[paddle.static.InputSpec([None, 3, 5, 5], "float32")], full_graph=True)
    program = static.get_concrete_program(x)[0].main_program
    assert not any("t2p_" in op.name() for op in program.global_block().ops)


@pytest.mark.parametrize("shape", [(2, 98, 64, 32), (4, 8, 16, 32), (3, 5, 7), (2, 3)], ids=str)
@pytest.mark.parametrize("threads", [1, 3])
def test_gather_blocks_equals_paddles_gather(shape, threads, monkeypatch):
    monkeypatch.setattr(native, "_threads", threads)
    rng = np.random.default_rng(sum(shape))
    x = paddle.to_tensor(rng.standard_normal(shape).astype(np.float32))
    index = paddle.to_tensor(rng.integers(0, shape[1], 3 * shape[1]).astype(np.int64))
    with paddle.no_grad():
        assert np.array_equal(native.native_gather_blocks(x, index).numpy(), paddle.gather(x, index, axis=1).numpy())
    with pytest.raises(Exception, match="out of range"):
        native.native_gather_blocks(x, paddle.to_tensor(np.array([shape[1]], dtype=np.int64)))


@pytest.mark.parametrize("case", [((2, 98, 64, 32), 2), ((8, 49, 4, 32), 2), ((3, 5, 7), 1), ((6, 9), 0)], ids=str)
def test_axis_mean_is_the_correctly_rounded_float64_mean(case):
    # what numerics.mean took by a float64 copy for a non-trailing axis (BiFormer's region means)
    shape, axis = case
    x = (np.random.default_rng(len(shape)).standard_normal(shape) * 3.0 + 1.0).astype(np.float32)
    expected = x.astype(np.float64).mean(axis=axis).astype(np.float32)
    with paddle.no_grad():
        assert np.array_equal(native.native_axis_mean(paddle.to_tensor(x), axis).numpy(), expected)
        assert np.array_equal(numerics.mean(paddle.to_tensor(x), axis=axis, keepdim=True).numpy(),
                              np.expand_dims(expected, axis))


@pytest.mark.parametrize("shape", [(2, 96, 56, 56), (3, 384, 14, 14), (1, 48, 17, 300), (2, 5, 3, 7)], ids=str)
@pytest.mark.parametrize("threads", [1, 3])
def test_channel_layer_norm_is_closer_to_float64_than_layernorm2d_ops(shape, threads, monkeypatch):
    # RegionViT's LayerNorm2d: the same steps, its statistics from double sums; within float32 noise
    # of the ops' result and at least as close to float64, at any thread count
    from paddle_models.regionvit import LayerNorm2d

    monkeypatch.setattr(native, "_threads", threads)
    rng = np.random.default_rng(sum(shape))
    norm = LayerNorm2d(shape[1])
    norm.weight.set_value(rng.standard_normal(norm.weight.shape).astype(np.float32))
    norm.bias.set_value(rng.standard_normal(norm.bias.shape).astype(np.float32))
    x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(np.float32)
    x64, w64, b64 = x.astype(np.float64), norm.weight.numpy().astype(np.float64), norm.bias.numpy().astype(np.float64)
    centred = x64 - x64.mean(1, keepdims=True)
    exact = centred / np.sqrt((centred ** 2).mean(1, keepdims=True) + 1e-5) * w64.reshape(1, -1, *[1] * (len(shape) - 2)) \
        + b64.reshape(1, -1, *[1] * (len(shape) - 2))
    with paddle.no_grad():
        ours = norm(paddle.to_tensor(x)).numpy()
        assert np.array_equal(ours, native.native_channel_layer_norm(paddle.to_tensor(x), norm.weight, norm.bias, 1e-5).numpy())
    monkeypatch.setattr(native, "runs_natively", lambda *args: False)
    with paddle.no_grad():
        ops = norm(paddle.to_tensor(x)).numpy()
    assert _rel(ours, ops) <= REL_TOL
    assert np.abs(ours - exact).max() <= np.abs(ops - exact).max() * 1.05


def test_a_linear_adds_its_bias_by_the_kernel_where_nothing_is_recorded(monkeypatch):
    calls = []
    kernel = native.native_add_row_bias
    monkeypatch.setattr(native, "native_add_row_bias", lambda x, b: calls.append(1) or kernel(x, b))
    paddle.seed(6)
    x, linear = paddle.randn([2, 7, 16]), Linear(16, 24)
    expected = F.linear(x, linear.weight, linear.bias).numpy()
    with paddle.no_grad():
        assert np.array_equal(linear(x).numpy(), expected)
    assert calls == [1]
    assert np.array_equal(linear(x).numpy(), expected) and calls == [1]  # recording a gradient: Paddle's add


@pytest.mark.parametrize("threads", [2, 3])
def test_the_kernels_split_among_threads_give_the_same_values(threads, monkeypatch):
    # each thread takes whole maps (channel groups for the large filters, blocks for GELU), every
    # output summed as with one thread: bit for bit the same at any count, part groups included
    rng = np.random.default_rng(threads)
    x = paddle.to_tensor(rng.standard_normal((3, 40, 17, 23)).astype(np.float32))
    bias = paddle.to_tensor(rng.standard_normal(40).astype(np.float32))
    filters = {k: paddle.to_tensor((rng.standard_normal((40, 1, k, k)) / k).astype(np.float32)) for k in (3, 11)}

    def outputs():
        with paddle.no_grad():
            convs = [native.native_depthwise_conv2d(x, w, bias).numpy() for w in filters.values()]
            return convs + [native.native_gelu(x).numpy(), native.native_add_channel_bias(x.clone(), bias).numpy(),
                            native.native_add_row_bias(x.transpose([0, 2, 3, 1]).contiguous(), bias).numpy()]

    monkeypatch.setattr(native, "_threads", 1)
    serial = outputs()
    native.set_threads(threads)
    assert native.threads() == threads
    assert all(np.array_equal(a, b) for a, b in zip(outputs(), serial))


def test_the_kernels_take_paddles_thread_count(monkeypatch):
    monkeypatch.setattr(native, "_threads", None)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert native.threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert native.threads() == 1  # Paddle's own cap without it


def test_a_pointwise_conv_adds_its_bias_by_the_kernel_where_nothing_is_recorded(monkeypatch):
    calls = []
    kernel = native.native_add_channel_bias
    monkeypatch.setattr(native, "native_add_channel_bias", lambda x, b: calls.append(1) or kernel(x, b))
    paddle.seed(5)
    x, conv = paddle.randn([2, 16, 9, 13]), Conv2D(16, 24, 1)
    expected = F.conv2d(x, conv.weight, conv.bias).numpy()
    with paddle.no_grad():
        assert np.array_equal(conv(x).numpy(), expected)
    assert calls == [1]
    assert np.array_equal(conv(x).numpy(), expected) and calls == [1]  # recording a gradient: Paddle's add


def test_layers_take_the_kernels_only_when_nothing_is_recorded_and_never_in_a_graph():
    paddle.seed(4)
    x = paddle.randn([2, 16, 9, 13])
    conv, gelu, norm = Conv2D(16, 16, 3, padding=1, groups=16), GELU(), numerics.GroupNorm(1, 16)
    large = DepthwiseConv2D(16, 11)
    with paddle.no_grad():
        assert np.array_equal(conv(x).numpy(), native.native_depthwise_conv2d(x, conv.weight, conv.bias).numpy())
        assert np.array_equal(large(x).numpy(), native.native_depthwise_conv2d(x, large.weight, large.bias).numpy())
        assert np.array_equal(gelu(x).numpy(), native.native_gelu(x).numpy())
        assert np.array_equal(norm(x).numpy(), native.native_group_norm(x, norm.weight, norm.bias, 1, 1e-5).numpy())
    # recording gradients (training): Paddle's ops, bit for bit
    assert np.array_equal(conv(x).numpy(), F.conv2d(x, conv.weight, conv.bias, padding=1, groups=16).numpy())
    trainable = x.clone()
    trainable.stop_gradient = False
    assert np.array_equal(gelu(trainable).numpy(), F.gelu(trainable).numpy())
    for layer in (conv, gelu, norm, large, Linear(13, 5)):
        static = paddle.jit.to_static(layer, full_graph=True)
        program = static.forward.get_concrete_program(x)[0].main_program
        ops = {op.name() for op in program.global_block().ops}
        assert not any("t2p_" in name for name in ops), ops


def test_switched_off_or_unbuildable_means_paddles_kernels_and_one_warning(tmp_path, monkeypatch):
    code = ("import paddle; from paddle_models import native, layers; "
            "assert not native.native_kernels_available(); "
            "print(layers.GELU()(paddle.to_tensor([1.0])).numpy()[0])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**__import__("os").environ, "TORCH2PADDLE_NATIVE": "0"},
                          cwd=str(__import__("pathlib").Path(native.__file__).parents[1]))
    assert done.returncode == 0, done.stderr
    assert abs(float(done.stdout.split()[-1]) - 0.8413447) < 1e-6
    assert "unavailable" not in done.stderr  # switched off on purpose: no warning
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "KERNEL_SOURCES", [broken])
    monkeypatch.setenv("TORCH2PADDLE_CACHE", str(tmp_path / "cache"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.native_kernels_available.__wrapped__() is False
    assert len(caught) == 1 and "compiled CPU kernels unavailable" in str(caught[0].message)
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))  # nothing half-built left to load
