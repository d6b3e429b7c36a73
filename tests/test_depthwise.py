"""The FFT depthwise convolution (paddle_models/depthwise.py) against Paddle's own ``F.conv2d``, on
every map shape FCViT's 11x11 token-mixing convs and BiFormer's 5x5 LePE see: classification at 224
(56/28/14/7), the dense backbones at verify's sizes (256x352, 384x512) and odd / non-square maps;
forward and both gradients, within float32 noise relative to the largest value."""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddle_models.depthwise import DepthwiseConv2D, _smooth_length, depthwise_conv2d_fft

REL_TOL = 2e-6

SHAPES = [  # (batch, channels, H, W)
    (2, 32, 56, 56), (2, 64, 56, 56), (2, 128, 28, 28), (2, 160, 14, 14), (2, 320, 14, 14),
    (2, 320, 7, 7), (2, 512, 7, 7),                                            # 224x224, tiny and b12
    (1, 64, 64, 88), (1, 128, 32, 44), (1, 320, 16, 22), (1, 512, 8, 11),     # 256x352 (dense)
    (1, 64, 96, 128), (1, 512, 12, 16),                                        # 384x512 (dense)
    (2, 32, 57, 57), (2, 64, 29, 29), (2, 160, 15, 15), (2, 320, 8, 8),       # 225x225
    (1, 64, 13, 19), (1, 512, 25, 38), (1, 8, 1, 1), (1, 8, 3, 5), (3, 16, 6, 17),  # odd, tiny, wide
]


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


LEPE_SHAPES = [  # 5x5 (what fft_applies admits; BiFormer's LePE maps), odd maps included
    (2, 64, 56, 56), (2, 128, 28, 28), (2, 256, 14, 14), (2, 512, 7, 7), (1, 64, 64, 88), (1, 128, 29, 31),
]


@pytest.mark.parametrize("shape,kernel", [(s, 11) for s in SHAPES] + [(s, 5) for s in LEPE_SHAPES],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"k{v}")
def test_fft_depthwise_equals_paddle_conv(shape, kernel):
    b, c, h, w = shape
    rng = np.random.default_rng(h * 1000 + w + kernel)
    x = paddle.to_tensor(rng.standard_normal(shape, dtype=np.float32), stop_gradient=False)
    weight = paddle.to_tensor(rng.standard_normal((c, 1, kernel, kernel), dtype=np.float32) * 0.1, stop_gradient=False)
    bias = paddle.to_tensor(rng.standard_normal(c, dtype=np.float32), stop_gradient=False)
    grad_out = paddle.to_tensor(rng.standard_normal(shape, dtype=np.float32))

    expected = F.conv2d(x, weight, bias, padding=kernel // 2, groups=c)
    actual = depthwise_conv2d_fft(x, weight, bias)
    assert actual.shape == expected.shape
    assert _rel(actual.numpy(), expected.numpy()) <= REL_TOL
    for got, want in zip(paddle.grad([actual], [x, weight, bias], [grad_out]),
                         paddle.grad([expected], [x, weight, bias], [grad_out])):
        assert _rel(got.numpy(), want.numpy()) <= REL_TOL


@pytest.fixture
def without_compiled_kernels(monkeypatch):
    """The FFT route as it runs where torch2paddle's compiled kernels are not built (native.py):
    where they are, they take the FFT's place (tests/test_native.py)."""
    from paddle_models import native
    monkeypatch.setattr(native, "native_kernels_available", lambda: False)


def test_layer_is_fft_without_gradients_and_conv_otherwise(without_compiled_kernels):
    paddle.seed(0)
    layer = DepthwiseConv2D(16, 11)
    assert sorted(layer.state_dict()) == ["bias", "weight"] and layer.weight.shape == [16, 1, 11, 11]
    x = paddle.randn([2, 16, 9, 13])
    with paddle.no_grad():
        dynamic = layer(x)
        assert np.array_equal(dynamic.numpy(), depthwise_conv2d_fft(x, layer.weight, layer.bias).numpy())
    # recording gradients (training): Paddle's conv, bit for bit (see DepthwiseConv2D on AdamW)
    trained = layer(x)
    assert not trained.stop_gradient
    assert np.array_equal(trained.numpy(), F.conv2d(x, layer.weight, layer.bias, padding=5, groups=16).numpy())
    layer.eval()
    assert np.array_equal(layer(x).numpy(), trained.numpy())  # eval mode alone does not switch: no_grad does
    static = paddle.jit.to_static(layer, full_graph=True)
    program = static.forward.get_concrete_program(x)[0].main_program
    ops = {op.name() for op in program.global_block().ops}
    assert not any("fft" in name for name in ops) and any("conv2d" in name for name in ops), ops
    with paddle.no_grad():
        assert _rel(static(x).numpy(), dynamic.numpy()) <= REL_TOL


def test_smooth_lengths():
    assert [_smooth_length(n) for n in (1, 7, 11, 17, 23, 66, 97)] == [1, 8, 12, 18, 24, 72, 100]
    with pytest.raises(ValueError):
        DepthwiseConv2D(4, 4)


def test_conv2d_adds_its_bias_as_nn_conv2d_does():
    from paddle_models.layers import Conv2D
    paddle.seed(1)
    for args, kw in [((8, 16, 1), {}), ((8, 8, 3), {"padding": 1, "groups": 8}),  # 1x1, depthwise 3x3
                     ((3, 8, 7), {"stride": 4, "padding": 3})]:                   # the strided stem
        ours = Conv2D(*args, **kw)
        stock = paddle.nn.Conv2D(*args, **kw)
        stock.set_state_dict(ours.state_dict())
        x = paddle.randn([2, args[0], 13, 17])
        assert np.array_equal(ours(x).numpy(), stock(x).numpy())


def test_fft_applies_from_5x5_depthwise_same_convs_without_gradients():
    from paddle_models.biformer import Conv2D as BiFormerConv2D
    from paddle_models.depthwise import fft_applies
    from paddle_models.layers import Conv2D
    paddle.seed(2)
    x = paddle.randn([2, 16, 14, 14])
    cases = [((16, 16, 5), {"padding": 2, "groups": 16}, True),   # BiFormer's LePE
             ((16, 16, 3), {"padding": 1, "groups": 16}, False),  # 3x3: Paddle's kernel is faster
             ((16, 16, 5), {"padding": 1, "groups": 16}, False),  # not 'same'
             ((16, 16, 5), {"padding": 2, "groups": 16, "stride": 2}, False),
             ((16, 32, 5), {"padding": 2, "groups": 16}, False),  # a channel multiplier
             ((16, 16, 5), {"padding": 2}, False)]                # dense
    for args, kw, fft in cases:
        layer = Conv2D(*args, **kw)
        with paddle.no_grad():
            assert fft_applies(layer, x) == fft, (args, kw)
        assert not fft_applies(layer, x)  # recording gradients
    # BiFormer's LePE never takes the FFT (precision: biformer.Conv2D): Paddle's conv while recording
    # gradients, else the compiled kernel (tests/test_native.py), or Paddle's conv where it is not built
    from paddle_models import native
    lepe = BiFormerConv2D(16, 16, 5, padding=2, groups=16)
    direct = F.conv2d(x, lepe.weight, lepe.bias, padding=2, groups=16).numpy()
    assert np.array_equal(lepe(x).numpy(), direct)
    lepe.eval()
    with paddle.no_grad():
        expected = native.native_depthwise_conv2d(x, lepe.weight, lepe.bias).numpy() if native.native_kernels_available() else direct
        assert np.array_equal(lepe(x).numpy(), expected)


def test_cached_kernel_spectrum_follows_the_weight(without_compiled_kernels):
    paddle.seed(3)
    layer = DepthwiseConv2D(8, 11)
    x = paddle.randn([1, 8, 20, 24])
    with paddle.no_grad():
        first = layer(x)
        assert np.array_equal(first.numpy(), depthwise_conv2d_fft(x, layer.weight, layer.bias).numpy())
        assert np.array_equal(layer(x).numpy(), first.numpy())  # served from the cache: the same bits
        layer.weight.set_value(layer.weight * 2.0)  # edited in place
        assert np.array_equal(layer(x).numpy(), depthwise_conv2d_fft(x, layer.weight, layer.bias).numpy())
        layer.set_state_dict({"weight": paddle.randn([8, 1, 11, 11]), "bias": layer.bias})  # loaded
        assert np.array_equal(layer(x).numpy(), depthwise_conv2d_fft(x, layer.weight, layer.bias).numpy())
        other = paddle.randn([2, 8, 9, 31])  # another map size
        assert np.array_equal(layer(other).numpy(), depthwise_conv2d_fft(other, layer.weight, layer.bias).numpy())
    assert "_kernel_spectrum" not in layer.state_dict()
