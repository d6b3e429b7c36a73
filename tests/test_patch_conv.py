"""The space-to-depth strided conv (paddle_models/patch_conv.py) against Paddle's own ``F.conv2d``:
CrossFormer's stem kernels at stride 4 on classification and dense image sizes, odd sizes, sizes
whose last rows no output reads, no padding; each within float32 noise of a float64 conv, as
close to it as Paddle's float32 conv is."""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddle_models.patch_conv import PatchConv2D, patch_conv2d

CASES = [  # (batch, in, H, W, out, kernel, stride, padding)
    (2, 3, 224, 224, 12, 32, 4, 14), (2, 3, 224, 224, 12, 16, 4, 6),     # crossformer_small's stem
    (1, 3, 224, 224, 16, 32, 4, 14), (1, 3, 224, 224, 24, 16, 4, 6),     # base / large widths
    (1, 3, 256, 352, 12, 32, 4, 14), (1, 3, 384, 512, 12, 16, 4, 6),     # dense sizes
    (1, 3, 225, 231, 6, 32, 4, 14), (1, 3, 37, 45, 5, 16, 4, 0),         # odd sizes, rows dropped
    (1, 3, 38, 41, 5, 16, 4, 6), (1, 2, 9, 11, 3, 8, 2, 3), (1, 3, 32, 32, 4, 32, 4, 14),
]


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_patch_conv_equals_paddle_conv(case):
    b, c, h, w, o, kernel, stride, padding = case
    rng = np.random.default_rng(h * 1000 + w + kernel)
    x = rng.standard_normal((b, c, h, w))
    weight = rng.standard_normal((o, c, kernel, kernel)) / kernel
    bias = rng.standard_normal(o)
    exact = F.conv2d(*map(paddle.to_tensor, (x, weight, bias)), stride=stride, padding=padding).numpy()
    x32, w32, b32 = (paddle.to_tensor(a.astype(np.float32)) for a in (x, weight, bias))
    paddle_conv = F.conv2d(x32, w32, b32, stride=stride, padding=padding).numpy()
    ours = patch_conv2d(x32, w32, b32, stride, padding).numpy()
    assert ours.shape == exact.shape
    assert _rel(ours, exact) <= max(2.0 * _rel(paddle_conv, exact), 2e-7), (_rel(ours, exact), _rel(paddle_conv, exact))
    assert _rel(ours, paddle_conv) <= 2e-6


def test_layer_takes_the_form_without_gradients_and_from_four_strides():
    paddle.seed(0)
    x = paddle.randn([1, 3, 64, 72])
    for kernel, used in ((4, False), (8, False), (16, True), (32, True)):
        layer = PatchConv2D(3, 6, kernel, stride=4, padding=(kernel - 4) // 2)
        assert sorted(layer.state_dict()) == ["bias", "weight"]
        direct = F.conv2d(x, layer.weight, layer.bias, stride=4, padding=(kernel - 4) // 2)
        with paddle.no_grad():
            fast = layer(x)
            form = patch_conv2d(x, layer.weight, layer.bias, 4, (kernel - 4) // 2)
        assert np.array_equal(fast.numpy(), (form if used else direct).numpy())
        # recording gradients (training): Paddle's conv, bit for bit
        trained = layer(x)
        assert not trained.stop_gradient
        assert np.array_equal(trained.numpy(), direct.numpy())
    static = paddle.jit.to_static(layer, full_graph=True)
    program = static.forward.get_concrete_program(x)[0].main_program
    ops = {op.name() for op in program.global_block().ops}
    assert not any("pixel_unshuffle" in name for name in ops) and any("conv2d" in name for name in ops), ops
