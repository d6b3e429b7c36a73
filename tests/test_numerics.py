"""paddle_models/numerics.py: float32 reductions and norms as accurate as torch's (no float64), held
to torch's own float64 computation next to torch's float32 error on the same input."""
import numpy as np
import paddle
import pytest
import torch

from paddle_models import numerics


def _rel(actual, exact):
    return np.abs(actual - exact).max() / np.abs(exact).max()


def test_numerics_reductions_stay_at_the_exact_value():
    """numerics.mean (float32, blocked and corrected) within rounding of the exact mean, where
    Paddle's plain float32 mean drifts; std_mean as float64 computes it."""
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


def test_std_mean_and_half_means_stay_float32_and_exact():
    """std_mean (FCViT's GlobalContext) in float32 within two ulps of the exact std and one of the
    exact mean, where it used float64; half inputs reduced in float32.  A traced graph (what export
    writes) of both holds no float64 value.  Axes that are not trailing keep float64 (BiFormer's
    region means, which only route: faster and correctly rounded), still exact."""
    rng = np.random.default_rng(11)
    x_np = (rng.standard_normal((2, 49, 64, 32)) * 2 + 3).astype(np.float32)
    x = paddle.to_tensor(x_np)
    exact = x_np.astype(np.float64).mean(axis=2)
    ulp = np.spacing(np.float32(np.abs(exact).max()))
    assert np.abs(numerics.mean(x, axis=2).numpy() - exact).max() <= ulp / 2
    half = numerics.mean(x.astype("float16"), axis=[2, 3])
    assert half.dtype == paddle.float16
    assert np.array_equal(half.numpy(), numerics.mean(x.astype("float16").astype("float32"), axis=[2, 3]).astype("float16").numpy())

    def statistics(t):
        return numerics.std_mean(t.reshape([2, 4, -1]), axis=[1, 2], keepdim=True), numerics.mean(t, axis=[-2, -1])

    (std, mu), _ = statistics(x)
    rows = x_np.reshape(2, -1).astype(np.float64)
    assert np.abs(std.numpy().ravel() - rows.std(axis=1, ddof=1)).max() <= 2 * np.spacing(np.float32(rows.std(axis=1).max()))
    assert np.abs(mu.numpy().ravel() - rows.mean(axis=1)).max() <= ulp
    program = paddle.jit.to_static(statistics, full_graph=True).get_concrete_program(x)[0].main_program
    dtypes = {str(value.dtype) for op in program.global_block().ops for value in op.results()}
    assert not any("float64" in dtype for dtype in dtypes), dtypes


@pytest.mark.parametrize("shape, groups", [((4, 64, 56, 56), 1), ((2, 320, 14, 14), 1), ((3, 12, 7, 5), 3),
                                           ((2, 64, 13, 17), 1)])
def test_group_norm_in_float32_is_as_accurate_as_torch(shape, groups):
    """numerics.GroupNorm (float32 statistics, its own backward) against torch's GroupNorm in float64:
    output and input gradient within 2.5x torch's own float32 error (measured 0.7-1.8x); Paddle's
    stock GroupNorm, whose statistics sum naively, is further off on offset inputs."""
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
    assert _rel(y.numpy(), y64) <= 2.5 * _rel(y32, y64)
    assert _rel(x.grad.numpy(), g64) <= 2.5 * _rel(g32, g64)


@pytest.mark.parametrize("shape, groups", [((4, 64, 56, 56), 1), ((2, 320, 14, 14), 1), ((3, 12, 7, 5), 3),
                                           ((2, 64, 13, 17), 1), ((2, 96, 35, 35), 1)])
def test_traced_group_norm_and_mean_are_as_accurate_as_torch(shape, groups):
    """The static-graph forms that export traces (chunked means; GroupNorm applied as a per-channel
    scale and shift): GroupNorm and the mean over (C, H, W) within 2.5x torch float32's own error of
    torch float64."""
    rng = np.random.default_rng(sum(shape) + 1)
    x_np = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)
    weight, bias = (rng.standard_normal(shape[1]).astype(np.float32) for _ in range(2))
    gn = numerics.GroupNorm(num_groups=groups, num_channels=shape[1], epsilon=1e-5)
    gn.weight.set_value(weight)
    gn.bias.set_value(bias)
    gn.eval()
    traced = paddle.jit.to_static(gn, full_graph=True)

    def sample_means(t):
        return numerics.mean(t, axis=[1, 2, 3])

    mean = paddle.jit.to_static(sample_means, full_graph=True)
    x = paddle.to_tensor(x_np)

    def torch_gn(dtype):
        return torch.nn.functional.group_norm(torch.tensor(x_np, dtype=dtype), groups, torch.tensor(weight, dtype=dtype),
                                              torch.tensor(bias, dtype=dtype), 1e-5).numpy()

    y64 = torch_gn(torch.float64)
    assert _rel(traced(x).numpy(), y64) <= 2.5 * _rel(torch_gn(torch.float32), y64)
    exact = x_np.reshape(shape[0], -1).astype(np.float64).mean(axis=1)
    torch_error = np.abs(torch.tensor(x_np).mean(dim=[1, 2, 3]).numpy() - exact).max()
    assert np.abs(mean(x).numpy() - exact).max() <= max(2.5 * torch_error, np.spacing(np.float32(np.abs(exact).max())))


@pytest.mark.parametrize("shape, axis", [((2, 98, 64, 32), 2), ((8, 49, 4, 32), 2), ((3, 7, 1, 5), 2),
                                         ((1, 8, 8, 3136), 3), ((2, 8, 40, 196), -1), ((2, 3, 4100), -1), ((3, 5, 1), 2),
                                         ((2, 8, 3136), [1, 2]), ((2, 512, 7, 7), [-2, -1])])
def test_traced_mean_over_trailing_axes_is_as_accurate_as_torch(shape, axis):
    """The means export traces over the second-to-last axis (BiFormer's region means: a row of ones
    times each matrix), the last (FCViT's GlobalContext: the map times block columns of ones) and
    several trailing axes (the heads' pooling, in chunked rows): each within 2.5x torch float32's own
    error of the exact mean, as the traced GroupNorm above (an error that flipped a BiFormer top-k
    pick would show downstream too, in the export's check against the dynamic model)."""
    rng = np.random.default_rng(sum(shape))
    x_np = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)

    def trailing_means(t):
        return numerics.mean(t, axis=axis)

    traced = paddle.jit.to_static(trailing_means, full_graph=True)
    exact = x_np.astype(np.float64).mean(axis=tuple(axis) if isinstance(axis, list) else axis)
    torch_error = np.abs(torch.tensor(x_np).mean(dim=axis).numpy() - exact).max()
    ours = traced(paddle.to_tensor(x_np)).numpy()
    assert ours.shape == exact.shape
    assert np.abs(ours - exact).max() <= max(2.5 * torch_error, np.spacing(np.float32(np.abs(exact).max())))


@pytest.mark.parametrize("shape", [(1, 8, 3136), (2, 8, 196), (3, 8, 49)])
def test_traced_std_mean_is_as_accurate_as_torch(shape):
    """std_mean as export traces it (FCViT's GlobalContext standardises its [B, heads, H * W] map over
    heads and positions): std and mean each within 2.5x torch float32's own error of torch float64, or
    within two units in the last place (as the std tests above): at batch 1 each is one value, and
    torch's error of it is its rounding luck (6e-9 on the 3136-position map, where ours, a block sum
    scaled by 1/n and summed, rounds three times: 1.25e-7, one ulp)."""
    rng = np.random.default_rng(sum(shape) + 7)
    x_np = (rng.standard_normal(shape) * 0.5 + 2).astype(np.float32)

    def statistics(t):
        return numerics.std_mean(t, axis=[1, 2], keepdim=True)

    std, mu = paddle.jit.to_static(statistics, full_graph=True)(paddle.to_tensor(x_np))
    std32, mu32 = torch.std_mean(torch.tensor(x_np), dim=[1, 2], keepdim=True)
    std64, mu64 = (t.numpy() for t in torch.std_mean(torch.tensor(x_np, dtype=torch.float64), dim=[1, 2], keepdim=True))
    for ours, theirs, exact in ((std.numpy(), std32.numpy(), std64), (mu.numpy(), mu32.numpy(), mu64)):
        assert ours.shape == exact.shape
        assert np.abs(ours - exact).max() <= max(2.5 * np.abs(theirs - exact).max(), 2 * np.spacing(np.float32(np.abs(exact).max())))


@pytest.mark.parametrize("shape", [(2, 56, 56, 64), (2, 7, 7, 512), (3, 5, 96)])
def test_layer_norm_in_float32_is_as_accurate_as_torch(shape):
    """numerics.layer_norm (BiFormer's training LayerNorm): output and the input, weight and bias
    gradients within 2.5x torch float32's own error against torch float64 (measured 0.1-1.3x: on the
    56x56 map torch's own weight / bias gradients are 1.2e-6 off, these 1.5e-7)."""
    rng = np.random.default_rng(shape[-1])
    x_np = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    grad_np = rng.standard_normal(shape).astype(np.float32)
    weight, bias = (rng.standard_normal(shape[-1]).astype(np.float32) for _ in range(2))

    def torch_run(dtype):
        x, w, b = (torch.tensor(a, dtype=dtype, requires_grad=True) for a in (x_np, weight, bias))
        y = torch.nn.functional.layer_norm(x, shape[-1:], w, b, 1e-6)
        (y * torch.tensor(grad_np, dtype=dtype)).sum().backward()
        return [t.detach().numpy() for t in (y, x.grad, w.grad, b.grad)]

    x, w, b = (paddle.to_tensor(a, stop_gradient=False) for a in (x_np, weight, bias))
    y = numerics.layer_norm(x, w, b, 1e-6)
    (y * paddle.to_tensor(grad_np)).sum().backward()
    ours = [t.numpy() for t in (y, x.grad, w.grad, b.grad)]
    for name, mine, t32, t64 in zip(("output", "input grad", "weight grad", "bias grad"), ours,
                                    torch_run(torch.float32), torch_run(torch.float64)):
        assert _rel(mine, t64) <= 2.5 * _rel(t32, t64), name


@pytest.mark.parametrize("shape, axis", [((2, 64, 56, 56), 1), ((2, 320, 14, 14), 1), ((2, 3136, 64), -1)])
def test_add_bias_keeps_values_and_sums_its_gradient_as_torch(shape, axis):
    """numerics.add_bias: the same float32 values as a plain add; the bias gradient within 2.5x torch
    float32's sum error, where Paddle's own sum is several times further off."""
    rng = np.random.default_rng(shape[1])
    y_np = rng.standard_normal(shape).astype(np.float32)
    bias_np = rng.standard_normal(shape[axis]).astype(np.float32)
    grad_np = rng.standard_normal(shape).astype(np.float32)
    y, bias = paddle.to_tensor(y_np, stop_gradient=False), paddle.to_tensor(bias_np, stop_gradient=False)
    out = numerics.add_bias(y, bias, channel_axis=axis)
    (out * paddle.to_tensor(grad_np)).sum().backward()
    broadcast = [-1] + [1] * (len(shape) - 1 - axis % len(shape))
    assert np.array_equal(out.numpy(), (paddle.to_tensor(y_np) + paddle.to_tensor(bias_np).reshape(broadcast)).numpy())
    assert np.array_equal(y.grad.numpy(), grad_np)
    others = tuple(a for a in range(len(shape)) if a != axis % len(shape))
    exact = grad_np.astype(np.float64).sum(others)
    assert _rel(bias.grad.numpy(), exact) <= 2.5 * _rel(torch.tensor(grad_np).sum(others).numpy(), exact)
