"""The Python API and the registry, as the README documents them."""
import numpy as np
import paddle
import pytest
import torch

import converter
from converter.errors import UserError
from converter.registry import MODELS, get_spec

from conftest import requires_timm, run_python


@requires_timm
def test_timm_creates_registered_references():
    import timm

    import reference_torch.fcvit  # noqa: F401  (registers the models)

    model = timm.create_model("fcvit_tiny", num_classes=7)
    assert type(model).__name__ == "FCViT" and model.head.out_features == 7


BREAK_TIMM = """import sys
class _BrokenTimm:  # what importing timm does next to the CPU torch: its torchvision fails to load
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "timm":
            raise RuntimeError("operator torchvision::nms does not exist")
sys.meta_path.insert(0, _BrokenTimm())
"""


def test_references_work_where_timm_is_installed_but_broken():
    code = "import reference_torch.fcvit as m; print(type(m.fcvit_tiny(num_classes=3)).__name__)"
    returncode, stdout, stderr = run_python("-c", code, sitecustomize=BREAK_TIMM)
    assert returncode == 0 and stdout.strip() == "FCViT", stderr
    assert ("timm is installed but does not import (RuntimeError: operator torchvision::nms does not exist); "
            "the reference models are not registered with timm") in stderr


def test_create_models_by_name_in_eval_mode(official_checkpoint, tmp_path):
    src = official_checkpoint("fcvit_tiny")
    converter.convert("fcvit_tiny", src, tmp_path / "w.pdparams")
    pd_model = converter.create_paddle_model("fcvit_tiny", tmp_path / "w.pdparams")
    th_model = converter.create_torch_model("fcvit_tiny", src)
    assert not pd_model.training and not th_model.training
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    with torch.no_grad():
        a = th_model(torch.from_numpy(x)).numpy()
    b = pd_model(paddle.to_tensor(x)).numpy()
    assert a.shape == b.shape == (1, 1000)
    assert np.abs(a - b).max() <= 1e-5


def test_create_paddle_model_accepts_a_state_dict(official_checkpoint):
    result = converter.convert("fcvit_tiny", official_checkpoint("fcvit_tiny"), None)
    model = converter.create_paddle_model("fcvit_tiny", result.state_dict)
    np.testing.assert_array_equal(model.state_dict()["head.bias"].numpy(), result.state_dict["head.bias"])


def test_strict_paddle_loading_names_what_is_wrong(official_checkpoint):
    params = dict(converter.convert("fcvit_tiny", official_checkpoint("fcvit_tiny"), None).state_dict)
    params.pop("norm.weight")
    params["stray"] = np.zeros(1, np.float32)
    with pytest.raises(UserError, match=r"1 missing \(e.g. norm.weight\); 1 unexpected \(e.g. stray\)"):
        converter.create_paddle_model("fcvit_tiny", params)


def test_aliases_and_suggestions():
    assert get_spec("regionvit_tiny_224").name == "regionvit_tiny"
    with pytest.raises(UserError, match="did you mean.*crossformer_pp_small"):
        get_spec("crossformer_pp_smal")


def test_registry_covers_every_official_variant():
    assert {name for name, spec in MODELS.items() if not spec.dense} == {
        "fcvit_tiny", "fcvit_b12", "fcvit_b24", "fcvit_b48",
        "biformer_tiny", "biformer_small", "biformer_base", "biformer_stl", "biformer_stl_nchw",
        "crossformer_tiny", "crossformer_small", "crossformer_base", "crossformer_large",
        "crossformer_pp_small", "crossformer_pp_base", "crossformer_pp_large", "crossformer_pp_huge",
        "regionvit_tiny", "regionvit_small", "regionvit_medium", "regionvit_base",
        "regionvit_small_w14", "regionvit_small_w14_peg", "regionvit_base_w14", "regionvit_base_w14_peg",
    }


def test_registry_covers_every_official_dense_backbone():
    assert {name for name, spec in MODELS.items() if spec.dense} == {
        "fcvit_b12_feat", "fcvit_b24_feat",
        "biformer_small_det", "biformer_base_det", "biformer_small_seg", "biformer_base_seg",
        "crossformer_small_det", "crossformer_base_det", "crossformer_large_seg", "crossformer_pp_small_det",
        "regionvit_small_det", "regionvit_small_w14_det", "regionvit_small_w14_peg_det",
        "regionvit_base_det", "regionvit_base_w14_det", "regionvit_base_w14_peg_det",
    }
