"""The FFT depthwise convolution (paddle_models/depthwise.py) against Paddle's own ``F.conv2d``, on
every map shape FCViT's 11x11 token-mixing convs see: classification at 224 (56/28/14/7), the
dense backbones at verify's sizes (256x352, 384x512) and odd / non-square maps; forward and
both gradients, within float32 noise relative to the largest value."""
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


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fft_depthwise_equals_paddle_conv(shape):
    b, c, h, w = shape
    rng = np.random.default_rng(h * 1000 + w)
    x = paddle.to_tensor(rng.standard_normal(shape, dtype=np.float32), stop_gradient=False)
    weight = paddle.to_tensor(rng.standard_normal((c, 1, 11, 11), dtype=np.float32) * 0.1, stop_gradient=False)
    bias = paddle.to_tensor(rng.standard_normal(c, dtype=np.float32), stop_gradient=False)
    grad_out = paddle.to_tensor(rng.standard_normal(shape, dtype=np.float32))

    expected = F.conv2d(x, weight, bias, padding=5, groups=c)
    actual = depthwise_conv2d_fft(x, weight, bias)
    assert actual.shape == expected.shape
    assert _rel(actual.numpy(), expected.numpy()) <= REL_TOL
    for got, want in zip(paddle.grad([actual], [x, weight, bias], [grad_out]),
                         paddle.grad([expected], [x, weight, bias], [grad_out])):
        assert _rel(got.numpy(), want.numpy()) <= REL_TOL


def test_layer_is_fft_without_gradients_and_conv_otherwise():
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


def test_numerics_reductions_stay_at_the_exact_value():
    """numerics.mean (float32, blocked and corrected) within rounding of the exact mean, where
    Paddle's plain float32 mean drifts; std_mean as float64 computes it."""
    from paddle_models import numerics
    rng = np.random.default_rng(3)
    x_np = (rng.standard_normal((4, 64, 56, 56)) * 3 + 2).astype(np.float32)
    x = paddle.to_tensor(x_np)
    exact = x_np.astype(np.float64).mean(axis=(2, 3))
    ulp = np.spacing(np.abs(exact).astype(np.float32)).max()
    assert np.abs(numerics.mean(x, axis=[-2, -1]).numpy() - exact).max() <= ulp
    assert np.abs(numerics.mean(x.reshape([4, 64, -1]), axis=-1, keepdim=True).numpy()[..., 0] - exact).max() <= ulp
    flat = x_np.reshape(4, 4, -1).astype(np.float64)
    std, mean = numerics.std_mean(x.reshape([4, 4, -1]), axis=[1, 2], keepdim=True)
    exact_std = x_np.reshape(4, -1).astype(np.float64).std(axis=1, ddof=1)
    assert np.abs(std.numpy().ravel() - exact_std).max() <= np.spacing(np.float32(exact_std.max())) * 2
    assert np.abs(mean.numpy().ravel() - flat.reshape(4, -1).mean(axis=1)).max() <= ulp
    # gradient of the mean: 1/N (within an ulp: (1/56) * (1/56) through the blocked mean), the same
    # for every element, the correction pass outside autograd
    x.stop_gradient = False
    (grad,) = paddle.grad([numerics.mean(x, axis=[-2, -1]).sum()], [x])
    assert np.all(grad.numpy() == grad.numpy().flat[0])
    assert abs(grad.numpy().flat[0] - np.float32(1 / 3136)) <= np.spacing(np.float32(1 / 3136))


@pytest.mark.parametrize("shape, groups", [((4, 64, 56, 56), 1), ((2, 320, 14, 14), 1), ((3, 12, 7, 5), 3),
                                           ((2, 64, 13, 17), 1)])
def test_group_norm_in_float32_is_as_accurate_as_torch(shape, groups):
    """numerics.GroupNorm (float32 statistics, its own backward) against torch's GroupNorm in float64:
    output and input gradient within 2.5x torch's own float32 error (measured 0.7-1.8x); Paddle's
    stock GroupNorm, whose statistics sum naively, is further off on offset inputs."""
    import torch
    from paddle_models import numerics
    rng = np.random.default_rng(sum(shape))
    x_np = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)
    grad_np = rng.standard_normal(shape).astype(np.float32)
    weight, bias = (rng.standard_normal(shape[1]).astype(np.float32) for _ in range(2))

    def torch_run(dtype):
        x = torch.tensor(x_np, dtype=dtype, requires_grad=True)
        y = torch.nn.functional.group_norm(x, groups, torch.tensor(weight, dtype=dtype),
                                           torch.tensor(bias, dtype=dtype), 1e-5)
        (y * torch.tensor(grad_np, dtype=dtype)).sum().backward()
        return y.detach().numpy(), x.grad.numpy()

    gn = numerics.GroupNorm(num_groups=groups, num_channels=shape[1], epsilon=1e-5)
    gn.weight.set_value(weight)
    gn.bias.set_value(bias)
    x = paddle.to_tensor(x_np, stop_gradient=False)
    y = gn(x)
    (y * paddle.to_tensor(grad_np)).sum().backward()
    (y64, g64), (y32, g32) = torch_run(torch.float64), torch_run(torch.float32)
    err = lambda a, ref: np.abs(a - ref).max() / np.abs(ref).max()
    assert err(y.numpy(), y64) <= 2.5 * err(y32, y64)
    assert err(x.grad.numpy(), g64) <= 2.5 * err(g32, g64)
