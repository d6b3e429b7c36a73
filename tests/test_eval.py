"""eval: dataset layouts, unreadable images, our preprocessing against timm's eval transform,
and top-1 / top-5 of both frameworks against expectations computed here by hand.

No ImageNet here: the images are the photographs scikit-image ships plus generated ones.
"""
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from converter.datasets import Sample, image_folder, list_file, open_dataset, read_sample
from converter.errors import UserError
from converter.evaluate import load_batches, topk_hits
from converter.preprocess import load_image
from converter.registry import MODELS, EvalPreprocessing, get_spec

from conftest import assert_one_line_error, cli, requires_timm

NAME = "fcvit_tiny"
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "camera.png")  # camera: grayscale; the rest RGB, square to 3:2


def photo_paths() -> list:
    import skimage.data

    return [Path(skimage.data.__file__).parent / name for name in PHOTOS]


def generated_images(directory: Path) -> list:
    """Synthetic images in the modes and sizes real datasets contain: grayscale, RGBA, palette,
    CMYK, odd aspect ratios, and one smaller than the crop (upsampled by the resize)."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:250, 0:333]
    gradient = np.stack([xx * 255 // 332, yy * 255 // 249, (xx + yy) % 256], -1).astype(np.uint8)
    images = {
        "gradient.png": Image.fromarray(gradient),
        "noise_gray.jpg": Image.fromarray(rng.integers(0, 256, (333, 250), dtype=np.uint8)),
        "alpha.png": Image.fromarray(rng.integers(0, 256, (300, 301, 4), dtype=np.uint8), "RGBA"),
        "palette.gif": Image.fromarray(gradient).convert("P"),
        "tiny.bmp": Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)),
        "cmyk.jpg": Image.fromarray(gradient).convert("CMYK"),
    }
    paths = []
    for name, img in images.items():
        img.save(directory / name)
        paths.append(directory / name)
    return paths


def write_corrupt_images(directory: Path) -> list:
    """A text file named like a JPEG and a PNG cut in half."""
    directory.mkdir(parents=True, exist_ok=True)
    fake, cut = directory / "not_an_image.JPEG", directory / "truncated.png"
    fake.write_text("this is not an image\n")
    data = photo_paths()[1].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    return [fake, cut]


# --- preprocessing vs timm ------------------------------------------------------------------
# timm's eval transform is the yardstick.  timm cannot be imported on every machine that runs
# these tests (reference_torch/registration.py says why), so its output on the lossless test
# images is recorded in tests/data/timm_eval as PNG crops (tests/record_timm_eval.py); where timm imports, the tests
# below also check that recording and compare with timm live, on every image at full size.

TIMM_RECORDING = Path(__file__).parent / "data" / "timm_eval"  # <pipeline>/<crop size>/<image>.png
RECORDED_CROP = 64  # small crops keep the recording ~250 KB; the official size is recorded once per pipeline
OFFICIAL_PIPELINES = sorted({spec.preprocessing for spec in MODELS.values()}, key=repr)


def pipeline_id(pre: EvalPreprocessing) -> str:
    return f"{pre.interpolation}-crop{pre.crop_pct:g}"


def recorded_cases(directory: Path) -> dict:
    """key -> (image, pipeline, crop size) of each recorded timm output: every lossless image (JPEG
    decoders differ between builds) through every official pipeline, plus the gradient at 224."""
    images = [p for p in photo_paths() + generated_images(directory) if p.suffix != ".jpg"]
    cases = {}
    for pre in OFFICIAL_PIPELINES:
        for path in images:
            cases[f"{pipeline_id(pre)}/{RECORDED_CROP}/{path.name}"] = (path, pre, RECORDED_CROP)
        cases[f"{pipeline_id(pre)}/{pre.input_size}/gradient.png"] = (directory / "gradient.png", pre, pre.input_size)
    return cases


def gray_level_difference(ours: np.ndarray, theirs: np.ndarray, pre: EvalPreprocessing) -> float:
    """Max |ours - theirs| in units of 1/255 before normalisation."""
    std = np.asarray(pre.std, dtype=np.float64)[:, None, None]
    return float((np.abs(ours.astype(np.float64) - theirs) * std * 255).max())


def normalized(chw_uint8: np.ndarray, pre: EvalPreprocessing) -> np.ndarray:
    """A recorded crop as timm's ToTensor + Normalize turn it into the model input (float64)."""
    mean = np.asarray(pre.mean, dtype=np.float64)[:, None, None]
    std = np.asarray(pre.std, dtype=np.float64)[:, None, None]
    return (chw_uint8 / 255.0 - mean) / std


def timm_eval(path: Path, pre: EvalPreprocessing, **overrides) -> np.ndarray:
    from PIL import Image
    from timm.data.transforms_factory import transforms_imagenet_eval

    settings = dict(img_size=pre.input_size, crop_pct=pre.crop_pct, interpolation=pre.interpolation,
                    mean=pre.mean, std=pre.std)
    transform = transforms_imagenet_eval(**dict(settings, **overrides))
    with Image.open(path) as img:  # timm's and torchvision's image loaders convert to RGB
        return transform(img.convert("RGB")).numpy()


def timm_eval_uint8(path: Path, pre: EvalPreprocessing, size: int) -> np.ndarray:
    """timm's output with the normalisation undone: the CHW uint8 crop its PIL pipeline made."""
    mean = np.asarray(pre.mean, dtype=np.float64)[:, None, None]
    std = np.asarray(pre.std, dtype=np.float64)[:, None, None]
    levels = (timm_eval(path, pre, img_size=size) * std + mean) * 255
    crop = np.rint(levels)
    assert np.abs(levels - crop).max() < 1e-3, "timm's pipeline no longer works on whole gray levels"
    return crop.astype(np.uint8)


def recording_path(key: str) -> Path:
    return TIMM_RECORDING / f"{key}.png"


def recorded_timm_outputs() -> dict:
    """key -> CHW uint8 crop, for every recorded case."""
    from PIL import Image

    recorded = {}
    for path in TIMM_RECORDING.rglob("*.png"):
        with Image.open(path) as img:
            recorded[path.relative_to(TIMM_RECORDING).as_posix()[:-len(".png")]] = np.asarray(img).transpose(2, 0, 1)
    return recorded


@pytest.mark.parametrize("pre", OFFICIAL_PIPELINES, ids=pipeline_id)
def test_preprocessing_matches_recorded_timm_output_within_one_gray_level(pre, tmp_path):
    recorded = recorded_timm_outputs()
    cases = {k: c for k, c in recorded_cases(tmp_path).items() if c[1] == pre}
    assert cases and set(cases) <= set(recorded), "re-record: python tests/record_timm_eval.py"
    worst = max(gray_level_difference(load_image(path, pre, size), normalized(recorded[key], pre), pre)
                for key, (path, pre, size) in cases.items())
    print(f"max difference from timm's recorded eval transform: {worst:g} gray levels over {len(cases)} crops")
    assert worst <= 1.0


@pytest.mark.parametrize("wrong", [{"interpolation": "bilinear"}, {"crop_pct": 0.875}],
                         ids=["bilinear", "crop0.875"])
def test_timm_comparison_detects_the_seed_pipeline_errors(wrong, tmp_path):
    """The 1-gray-level check has teeth: the seed port's mistakes are far outside it."""
    pre = get_spec(NAME).preprocessing
    key = f"{pipeline_id(pre)}/{pre.input_size}/gradient.png"
    path, _, size = recorded_cases(tmp_path)[key]
    ours_wrong = load_image(path, dataclasses.replace(pre, **wrong), size)
    assert gray_level_difference(ours_wrong, normalized(recorded_timm_outputs()[key], pre), pre) > 10


@requires_timm
def test_recording_is_what_timm_gives(tmp_path):
    recorded = recorded_timm_outputs()
    for key, (path, pre, size) in recorded_cases(tmp_path).items():
        np.testing.assert_array_equal(timm_eval_uint8(path, pre, size), recorded[key], err_msg=key)


@requires_timm
@pytest.mark.parametrize("pre", OFFICIAL_PIPELINES, ids=pipeline_id)
def test_preprocessing_matches_live_timm_within_one_gray_level(pre, tmp_path):
    images = photo_paths() + generated_images(tmp_path)
    worst = max(gray_level_difference(load_image(p, pre), timm_eval(p, pre), pre) for p in images)
    print(f"max difference from timm's eval transform: {worst:g} gray levels over {len(images)} images")
    assert worst <= 1.0


# --- layouts ----------------------------------------------------------------------------------

def class_folders_with_nested_images(root: Path) -> None:
    """Three class folders; in each, an image on top named b_*, one in a sub-folder named a_*, and a
    text file.  torchvision lists a folder's own files before its sub-folders' (os.walk order)."""
    photos = photo_paths()
    for i, wnid in enumerate(["n04517823", "n01440764", "n02102040"]):
        (root / wnid / "sub").mkdir(parents=True)
        shutil.copy(photos[i], root / wnid / f"b_{photos[i].name}")
        shutil.copy(photos[i + 3], root / wnid / "sub" / f"a_{photos[i + 3].name}")
        (root / wnid / "notes.txt").write_text("not an image")


def test_image_folder_orders_classes_and_images_as_torchvision(tmp_path):
    root = tmp_path / "val"
    class_folders_with_nested_images(root)
    dataset = image_folder(root)
    assert [(s.path.relative_to(root).as_posix(), s.label) for s in dataset.samples] == [
        ("n01440764/b_chelsea.png", 0), ("n01440764/sub/a_motorcycle_left.png", 0),
        ("n02102040/b_coffee.png", 1), ("n02102040/sub/a_hubble_deep_field.jpg", 1),
        ("n04517823/b_astronaut.png", 2), ("n04517823/sub/a_rocket.jpg", 2)]
    assert dataset.num_classes == 3


@requires_timm
def test_image_folder_order_is_torchvisions(tmp_path):
    from torchvision.datasets import ImageFolder

    root = tmp_path / "val"
    class_folders_with_nested_images(root)
    assert [(str(s.path), s.label) for s in image_folder(root).samples] == ImageFolder(str(root)).samples


def test_list_file_layout(tmp_path):
    (tmp_path / "val dir").mkdir()
    list_path = tmp_path / "val_list.txt"
    list_path.write_text("# PaddleClas style\nval dir/a b.JPEG 7\n\nval dir/c.JPEG   0\n")
    for dataset in (list_file(tmp_path, list_path), open_dataset(list_path), open_dataset(tmp_path, list_path)):
        assert [(s.path, s.label) for s in dataset.samples] == [
            (tmp_path / "val dir" / "a b.JPEG", 7), (tmp_path / "val dir" / "c.JPEG", 0)]
        assert dataset.num_classes == 8


@pytest.mark.parametrize("text, message", [
    ("a.jpg 1\nb.jpg\n", "val_list.txt:2: expected 'relative/path label'"),
    ("a.jpg 1\nb.jpg one\n", "val_list.txt:2: label 'one' is not an integer"),
    ("a.jpg -3\n", "val_list.txt:1: label -3 is negative"),
    ("\n# only a comment\n", "no 'relative/path label' lines"),
], ids=["no-label", "word-label", "negative", "empty"])
def test_malformed_list_file_is_a_clear_error(tmp_path, text, message):
    (tmp_path / "val_list.txt").write_text(text)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        open_dataset(tmp_path / "val_list.txt")


def test_empty_or_flat_folders_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="no class sub-folders"):
        image_folder(tmp_path)
    shutil.copy(photo_paths()[0], tmp_path / "loose.png")
    with pytest.raises(UserError, match="holds images directly"):
        image_folder(tmp_path)
    (tmp_path / "n01440764").mkdir()
    (tmp_path / "n01440764" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="1 class folders but no image files"):
        image_folder(tmp_path)
    with pytest.raises(UserError, match="no such directory"):
        image_folder(tmp_path / "missing")


def test_limit_takes_an_even_spread_of_the_dataset(tmp_path):
    root = tmp_path / "val"
    for c in range(4):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(5):
            (root / f"c{c}" / f"{i}.png").write_bytes(b"")
    subset = open_dataset(root, limit=4)
    assert [s.label for s in subset.samples] == [0, 1, 2, 3]
    assert "4 of 20 images" in subset.description
    assert open_dataset(root, limit=4).samples == subset.samples
    assert len(open_dataset(root, limit=100)) == 20


def test_unreadable_images_are_reported_not_raised(tmp_path):
    pre = get_spec(NAME).preprocessing
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for path in write_corrupt_images(tmp_path) + [empty, tmp_path / "missing.png"]:
        image, problem = read_sample(Sample(path, 0), pre)
        assert image is None and problem.path == path and problem.reason, path
    image, problem = read_sample(Sample(photo_paths()[0], 0), pre)
    assert problem is None and image.shape == (3, 224, 224) and image.dtype == np.float32


def test_prefetching_threads_keep_dataset_order(tmp_path):
    pre = get_spec(NAME).preprocessing
    paths = generated_images(tmp_path / "gen") + write_corrupt_images(tmp_path / "bad")
    samples = [Sample(p, i) for i, p in enumerate(paths)]
    serial = list(load_batches(samples, pre, 3, workers=0))
    threaded = list(load_batches(samples, pre, 3, workers=2))
    assert [b.labels.tolist() for b in threaded] == [[0, 1, 2], [3, 4, 5], []]
    assert [len(b.unreadable) for b in threaded] == [0, 0, 2]
    for a, b in zip(serial, threaded):
        assert a.labels.tolist() == b.labels.tolist()
        if a.images is not None:
            np.testing.assert_array_equal(a.images, b.images)


def test_topk_hits():
    logits = np.array([[0.1, 0.9, 0.5, 0.3], [2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 1.0, 0.0]])
    labels = np.array([1, 2, 0])
    assert topk_hits(logits, labels, 1).tolist() == [True, False, False]
    assert topk_hits(logits, labels, 3).tolist() == [True, True, True]  # row 2: ties go to the lower index
    assert topk_hits(logits, labels, 2).tolist() == [True, False, True]


# --- accuracy of both frameworks against hand-computed expectations ------------------------

# Where each photo's label sits in the model's ranking of the 1000 classes (0 = its top class):
# 3 top-1 hits, 2 top-5-only hits, 2 misses just outside the top 5.
LABEL_RANKS = (0, 0, 0, 2, 2, 5, 5)
EXPECTED_TOP1 = 100 * 3 / 7
EXPECTED_TOP5 = 100 * 5 / 7


@pytest.fixture(scope="module")
def planned_labels(official_checkpoint):
    """The label of each photo, chosen from the torch reference's own ranking computed here,
    outside the evaluator, so that the expected scores are EXPECTED_TOP1 / EXPECTED_TOP5."""
    import torch

    from converter import create_torch_model

    model = create_torch_model(NAME, official_checkpoint(NAME))
    batch = np.stack([load_image(p, get_spec(NAME).preprocessing) for p in photo_paths()])
    with torch.no_grad():
        logits = model(torch.from_numpy(batch)).numpy()
    labels = []
    for row, rank in zip(logits, LABEL_RANKS):
        scores = np.sort(row)[::-1]
        # The planned outcome must not hinge on a near-tie that batching noise could flip: the label
        # is taken at the first rank of its kind (top-1 / top-5 only / miss) that is clear of every
        # class across a top-1 or top-5 boundary from it.
        clear = [r for r in SAME_OUTCOME[rank] if _clear_of_boundaries(scores, r)]
        assert clear, (rank, scores[:10])
        labels.append(int(np.argsort(-row)[clear[0]]))
    return labels


# Ranks with the same outcome (a top-1 hit, a top-5-only hit, a miss), the planned one first.
SAME_OUTCOME = {0: (0,), 2: (2, 3, 1, 4), 5: (5, 6, 7, 8, 9)}


def _clear_of_boundaries(scores: np.ndarray, rank: int, margin: float = 1e-3) -> bool:
    """``scores`` sorted high to low: the class at ``rank`` is more than ``margin`` from the nearest
    class on the other side of the top-1 and of the top-5 boundary."""
    for boundary in (1, 5):
        nearest = scores[boundary] if rank < boundary else scores[boundary - 1]
        if abs(scores[rank] - nearest) <= margin:
            return False
    return True


def imagenet_folder(root: Path, labels: list) -> Path:
    """``root/<wnid>/`` for all 1000 classes (class index = sorted position), photos placed by label."""
    for c in range(1000):
        (root / f"n{c:08d}").mkdir(parents=True)
    for i, (photo, label) in enumerate(zip(photo_paths(), labels)):
        shutil.copy(photo, root / f"n{label:08d}" / f"{i}_{photo.name}")
    write_corrupt_images(root / "n00000000")
    return root


def paddle_list_layout(root: Path, labels: list) -> Path:
    """``root/images/*`` plus ``root/val_list.txt`` naming them with their labels."""
    lines = []
    for i, (photo, label) in enumerate(zip(photo_paths(), labels)):
        (root / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, root / "images" / f"{i}_{photo.name}")
        lines.append(f"images/{i}_{photo.name} {label}")
    corrupt = write_corrupt_images(root / "images")
    lines += [f"images/{p.name} 0" for p in corrupt]
    (root / "val_list.txt").write_text("\n".join(lines) + "\n")
    return root / "val_list.txt"


def assert_scores(report: dict):
    assert report["images"] == 7 and report["skipped"] == 2
    for framework in ("torch", "paddle"):
        assert report[framework]["top1"] == pytest.approx(EXPECTED_TOP1), framework
        assert report[framework]["top5"] == pytest.approx(EXPECTED_TOP5), framework
        assert report[framework]["images_per_second"] > 0
    assert report["agreement"] == 100.0 and report["top1_delta"] == 0.0 and report["top5_delta"] == 0.0
    assert report["max_abs_logit_err"] < 1e-4
    assert sorted(Path(s["path"]).name for s in report["skipped_images"]) == ["not_an_image.JPEG", "truncated.png"]


def test_eval_on_an_imagenet_folder(capsys, tmp_path, official_checkpoint, planned_labels):
    root = imagenet_folder(tmp_path / "val", planned_labels)
    code, out, err = cli(capsys, "eval", NAME, "--data", root, "--torch-ckpt", official_checkpoint(NAME),
                         "--batch-size", 3, "--workers", 2, "--json", tmp_path / "eval.json")
    assert code == 0, err
    import json

    report = json.loads((tmp_path / "eval.json").read_text())
    assert_scores(report)
    assert "top-1" in out and "images/s" in out and "2 skipped (unreadable)" in out
    assert "truncated.png" in out and "resize 248 bicubic, crop 224" in out
    # The default runtime on CPU: the traced model under Paddle Inference, checked on the first batch.
    assert report["paddle_runtime"].startswith(("Paddle Inference (CPU, oneDNN fused ops only, ",
                                                "Paddle Inference (CPU, oneDNN on, "))
    assert len(report["paddle_runtime_check"]["candidate_seconds"]) == 2
    assert report["paddle_runtime_requested"] == "auto" and report["paddle_runtime_note"] is None
    check = report["paddle_runtime_check"]
    assert check["batch_size"] >= 1 and check["max_abs_err"] <= check["gate"] == 1e-5 * max(1, check["max_abs_logit"])
    assert f"paddle runs  {report['paddle_runtime']} (--paddle-runtime auto); first batch vs dygraph" in out
    for framework in ("torch", "paddle"):
        assert report[framework]["forward_seconds"] > 0


def test_eval_on_a_list_file_with_converted_params(capsys, tmp_path, official_checkpoint, planned_labels):
    import json

    list_path = paddle_list_layout(tmp_path / "data", planned_labels)
    params = tmp_path / f"{NAME}.pdparams"
    assert cli(capsys, "convert", NAME, official_checkpoint(NAME), params)[0] == 0
    code, out, err = cli(capsys, "eval", NAME, "--data", tmp_path / "data", "--list", list_path,
                         "--torch-ckpt", official_checkpoint(NAME), "--paddle-params", params,
                         "--batch-size", 4, "--workers", 0, "--json", tmp_path / "eval.json",
                         "--paddle-runtime", "dygraph")
    assert code == 0, err
    report = json.loads((tmp_path / "eval.json").read_text())
    assert_scores(report)
    assert report["paddle_params"] == str(params)
    assert report["paddle_runtime"] == "Paddle dygraph (CPU)" and report["paddle_runtime_check"] is None
    assert "paddle runs  Paddle dygraph (CPU) (--paddle-runtime dygraph)" in out


def failing_trace(spec, model, directory, input_size):
    raise UserError(f"{spec.name} cannot be exported to a static graph: boom")


def no_trace(spec, model, directory, input_size):
    """Stands in for the trace where the predictors below stand in for Paddle Inference."""
    return directory / "inference"


def predictors_like(model, offset=0.0, seconds=None):
    """For inference_runner: a predictor per oneDNN configuration that returns the dygraph model's
    logits plus ``offset``, after sleeping ``seconds[mode]`` (as a slower runtime would take)."""
    import time

    from converter.verify import paddle_forward

    def runner(path_prefix, *, onednn, threads=None):
        def run(batch):
            time.sleep((seconds or {}).get(onednn, 0.0))
            return paddle_forward(model(), batch) + offset
        return run
    return runner


def _patch_inference(monkeypatch, trace, offset=0.0, seconds=None):
    import converter.evaluate

    models = []  # the dygraph model eval builds, captured when the trace is asked for
    monkeypatch.setattr(converter.evaluate, "trace_for_inference",
                        lambda spec, model, *args: models.append(model) or trace(spec, model, *args))
    monkeypatch.setattr(converter.evaluate, "inference_runner", predictors_like(lambda: models[-1], offset, seconds))


@pytest.mark.parametrize("trace, offset, reason", [
    (failing_trace, 0.0, "cannot be exported to a static graph: boom"),
    (no_trace, 1.0, "differ from the dygraph model's by 1.000e+00 > gate"),  # far outside the gate
], ids=["trace-fails", "wrong-logits"])
def test_auto_falls_back_to_dygraph_and_inference_refuses(capsys, tmp_path, monkeypatch, official_checkpoint,
                                                           planned_labels, trace, offset, reason):
    import json

    _patch_inference(monkeypatch, trace, offset)
    root = imagenet_folder(tmp_path / "val", planned_labels)
    args = ("eval", NAME, "--data", root, "--torch-ckpt", official_checkpoint(NAME), "--batch-size", 9,
            "--workers", 0, "--no-progress")
    code, out, err = cli(capsys, *args, "--json", tmp_path / "eval.json")
    assert code == 0, err
    report = json.loads((tmp_path / "eval.json").read_text())
    assert_scores(report)
    assert report["paddle_runtime"] == "Paddle dygraph (CPU)"
    assert report["paddle_runtime_note"].startswith("Paddle Inference not used: ") and reason in report["paddle_runtime_note"]
    assert reason in out and out.count("Paddle Inference not used") == 1
    code, out, err = cli(capsys, *args, "--paddle-runtime", "inference", "--json", tmp_path / "refused.json")
    assert_one_line_error(code, err, "--paddle-runtime inference: ", reason)
    assert not (tmp_path / "refused.json").exists()


def test_auto_keeps_the_faster_paddle_inference_configuration(capsys, tmp_path, monkeypatch, official_checkpoint,
                                                               planned_labels):
    import json

    # oneDNN for the fused ops only is tried first; made the slower here, plain oneDNN on must be kept.
    _patch_inference(monkeypatch, no_trace, seconds={"fused": 0.3})
    root = imagenet_folder(tmp_path / "val", planned_labels)
    code, out, err = cli(capsys, "eval", NAME, "--data", root, "--torch-ckpt", official_checkpoint(NAME),
                         "--batch-size", 9, "--workers", 0, "--no-progress", "--json", tmp_path / "eval.json")
    assert code == 0, err
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["paddle_runtime"].startswith("Paddle Inference (CPU, oneDNN on, ")
    seconds = report["paddle_runtime_check"]["candidate_seconds"]
    assert set(seconds) == {report["paddle_runtime"], report["paddle_runtime"].replace("oneDNN on", "oneDNN fused ops only")}
    assert min(seconds, key=seconds.get) == report["paddle_runtime"] and max(seconds.values()) >= 0.3
    assert "faster on it (" in out and report["paddle_runtime_note"] is None


# --- bad input through the command line -------------------------------------------------------

def test_eval_errors_before_loading_any_model(capsys, tmp_path, official_checkpoint):
    src = official_checkpoint(NAME)
    code, _, err = cli(capsys, "eval", NAME, "--data", tmp_path, "--torch-ckpt", src)
    assert_one_line_error(code, err, "no class sub-folders")
    (tmp_path / "bad.txt").write_text("images/a.jpg\n")
    code, _, err = cli(capsys, "eval", NAME, "--data", tmp_path / "bad.txt", "--torch-ckpt", src)
    assert_one_line_error(code, err, "bad.txt:1: expected 'relative/path label'")
    (tmp_path / "big.txt").write_text("images/a.jpg 1000\n")
    code, _, err = cli(capsys, "eval", NAME, "--data", tmp_path / "big.txt", "--torch-ckpt", src)
    assert_one_line_error(code, err, "labels go up to 1000, but the model has 1000 classes")


def test_eval_with_no_readable_image_is_an_error(capsys, tmp_path, official_checkpoint):
    write_corrupt_images(tmp_path / "val" / "n01440764")
    code, _, err = cli(capsys, "eval", NAME, "--data", tmp_path / "val", "--torch-ckpt", official_checkpoint(NAME))
    assert_one_line_error(code, err, "none of the 2 images could be read")
    assert not list(tmp_path.glob("*.json"))
