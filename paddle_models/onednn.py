"""Ops written so that an exported graph also runs under Paddle Inference with oneDNN on.

oneDNN is Paddle Inference's CPU default; its graph passes and kernels in Paddle 3.3.1 break on
patterns the ports use, each of which has an exact (or float32-rounding) equivalent here:

* ``transpose`` followed by ``reshape`` to a constant shape: operator_reshape_onednn_fuse_pass
  fuses the pair into one oneDNN ``fused_transpose`` whose output type is the transpose's, not
  the reshape's.  Whatever checks or re-infers that type then fails: a ``concat`` taking it
  ("type tensor<..> of outputs[0][1] must be equal to type .. of inputs[1]"), or a following
  transpose+reshape pair fused in turn ("input tensor's dimension is 5, axis's size is 6").
  ``transpose_reshape`` reshapes the transpose to [0, -1] first (the pass skips a target holding
  a 0, Paddle's "keep this size"), then to the target.  Targets are constants wherever the batch
  is fixed (``export --batch-size``) or written as -1 (``layers.constant_shape``).
* ``transpose`` of more than 6 axes: the oneDNN kernel throws (std::exception).  Callers keep
  their permutations to at most 6 axes.
* ``F.pad(..., data_format="NHWC")`` (a ``pad3d`` in NDHWC): fails to run under oneDNN
  (std::exception, or a following transpose fused with the pad's squeeze: "Squeeze2 input dim 1
  should be equal to one").  ``pad_nhwc`` pads the same zeros through an NCHW view.
* ``pad`` of every axis (what ``F.pad`` of a 3-D tensor with 4 pads becomes): the oneDNN kernel
  swaps the pads as if the tensor were 2-D and writes past its output (heap corruption, crash or
  hang).  ``F.pad`` of a 4-D NCHW tensor (``pad3d``, last two axes) is fine.
* ``square`` whose input has another reader: inplace_pass turns the oneDNN square into an
  in-place one anyway, so the other reader gets the squares (``c.square() + c`` comes out as
  ``2 * c**2``).  Write ``c * c`` (the same float32 rounding).  ``paddle.std`` squares through
  a ``pow`` that the same pass makes in-place: fcvit_b12's logits came out 1.6 off; numerics.std_mean
  writes the square as a product.
* ``layer_norm`` on weights-only inputs: see ``TableLayerNorm``.
"""
from __future__ import annotations

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .layers import constant_shape, permute


def transpose_reshape(x, perm, shape):
    """``x.transpose(perm).reshape(shape)``, with the same values, that oneDNN does not fuse; in
    dygraph through the dense permutation (``layers.permute``).  The fuse pass matches only a
    constant target holding no 0 (a 0 keeps the input's size): a traced graph reshapes the
    transpose to [0, -1] first (a view where the inplace pass runs, as flatten was not always:
    crossformer_small batch 8 fused-only 702 -> 676 ms), then to the target, made a constant
    (``layers.constant_shape``); a target still built by ops needs no guard."""
    if paddle.in_dynamic_mode():
        return permute(x, perm).reshape(shape)
    shape = constant_shape(shape)
    y = x.transpose(perm)
    return (y.reshape([0, -1]) if _is_constant(shape) else y).reshape(shape)


@paddle.jit.not_to_static  # plain Python over the traced shape list
def _is_constant(shape) -> bool:
    return all(isinstance(size, int) for size in shape)


def pad_nhwc(x, pad_h: int, pad_w: int):
    """(B, H, W, C) -> (B, H + pad_h, W + pad_w, C), zeros at the bottom and right, as
    ``F.pad(x, [0, pad_w, 0, pad_h], data_format="NHWC")``: the rows of W*C values padded as
    one NCHW channel."""
    _, H, W, C = x.shape
    x = F.pad(x.reshape([-1, 1, H, W * C]), [0, pad_w * C, 0, pad_h])
    return x.reshape([-1, H + pad_h, W + pad_w, C])


class TableLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and state-dict keys) written out as mean / variance ops,
    for a LayerNorm whose input depends on weights only (a constant table through an MLP).

    In an exported graph such a subgraph is evaluated once at load by Paddle Inference's
    constant_folding_pass.  Under oneDNN the folded ``layer_norm`` fails ("Tensor holds no
    memory"): the oneDNN kernel leaves the op's Mean / Variance outputs unwritten in inference,
    and the pass copies every output of a folded op.  Elementwise ops and reductions fold fine.
    Only the traced (exported) graph takes this form; it differs from nn.LayerNorm's fused kernel
    by float32 rounding.  Dygraph, where the model trains, keeps the fused kernel: the DPB's
    gradients include mathematically-zero sums (a per-head bias softmax ignores) whose rounding
    the reduction form changes by up to 15x torch's own float32 error."""

    def forward(self, x):
        if paddle.in_dynamic_mode():
            return super().forward(x)
        mu = x.mean(axis=-1, keepdim=True)
        centred = x - mu
        var = (centred * centred).mean(axis=-1, keepdim=True)  # biased, as layer_norm; not .square(), see above
        return centred / paddle.sqrt(var + self._epsilon) * self.weight + self.bias
