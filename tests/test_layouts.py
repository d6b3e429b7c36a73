"""The recorded Paddle layouts that convert checks checkpoints against are the Paddle models'
own: rebuilt from the code and compared, key order included."""
import pytest

from converter import layouts
from converter.api import convert
from converter.layouts import built_layout, layout_file_text, paddle_layout, recorded_layouts
from converter.registry import MODELS, get_spec


@pytest.mark.parametrize("name", list(MODELS))
def test_every_recorded_layout_is_the_paddle_models_own(name):
    spec = get_spec(name)
    recorded = recorded_layouts(spec.family.name).get(name)
    assert recorded is not None, f"no recorded layout for {name}: run python -m converter.layouts"
    built = built_layout(spec)
    assert list(recorded.items()) == list(built.items())  # same keys, same order, same shapes


def test_record_files_are_what_the_recorder_writes():
    """Hand edits (or a stale record format) show up here, not as a puzzling mismatch later."""
    for family in {spec.family.name for spec in MODELS.values()}:
        text = (layouts.LAYOUT_DIR / f"{family}.json").read_text()
        assert text == layout_file_text(recorded_layouts(family))


def test_other_configurations_are_built_not_recorded(monkeypatch):
    spec = get_spec("fcvit_tiny")
    head = paddle_layout(spec, num_classes=10)["head.weight"]
    assert head[-1] == 10
    built = []
    monkeypatch.setattr(layouts, "built_layout", lambda *a, **k: built.append(a) or {})
    paddle_layout(spec)
    assert built == []  # the default configuration is read from the record


def test_convert_takes_the_recorded_layout_without_building_the_model(official_checkpoint, tmp_path, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("convert built the Paddle model")

    monkeypatch.setattr(layouts, "built_layout", no_build)
    result = convert("fcvit_tiny", official_checkpoint("fcvit_tiny"), tmp_path / "o.pdparams")
    assert result.report.converted > 0 and (tmp_path / "o.pdparams").stat().st_size > 0
