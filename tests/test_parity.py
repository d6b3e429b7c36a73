"""For every registered model: official-format checkpoint (seeded random weights, BatchNorm
statistics randomised) -> convert -> Paddle logits vs torch reference logits on the same
batch of 2 at the official input size, CPU float32."""
import numpy as np
import pytest

from converter import convert
from converter.fixtures import make_official_checkpoint
from converter.registry import MODELS
from converter.verify import run_verify

from conftest import MAX_ABS_ERR


# Dense backbones (feature maps, judged relative to each map's scale): tests/test_dense.py.
@pytest.mark.parametrize("name", [name for name, spec in MODELS.items() if not spec.dense])
def test_converted_model_matches_reference(name, tmp_path):
    # Not the session's cached checkpoint: that would keep the whole zoo (4.3 GB) on disk.
    src = make_official_checkpoint(name, tmp_path / f"{name}.pth")
    dst = tmp_path / f"{name}.pdparams"
    result = convert(name, src, dst)
    assert dst.is_file() and result.report.converted > 0
    report = run_verify(name, src, dst, batch_size=2, max_err=MAX_ABS_ERR)
    assert report.max_abs_err <= MAX_ABS_ERR, report.format()
    assert report.top1_agreement == 1.0
    assert np.isfinite(report.max_abs_err) and report.stages, "per-stage comparison missing"
    for stage in report.stages:  # features grow along residual stacks: judged relative to their scale
        assert stage["max_rel_err"] < 1e-5, stage
