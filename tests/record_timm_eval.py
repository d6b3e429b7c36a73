"""Record timm's eval transform on the test images as PNG crops in tests/data/timm_eval/.

test_eval.py holds our preprocessing to this recording, so the comparison also runs where timm
cannot be imported.  Re-record, where timm imports (pip install -e '.[timm]'), with

    python tests/record_timm_eval.py

test_recording_is_what_timm_gives then fails until the recording matches the installed timm.
"""
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_eval import TIMM_RECORDING, recorded_cases, recording_path, timm_eval_uint8  # noqa: E402


def main() -> None:
    import PIL
    import timm
    from PIL import Image

    shutil.rmtree(TIMM_RECORDING, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        for key, (path, pre, size) in recorded_cases(Path(tmp)).items():
            out = recording_path(key)
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(timm_eval_uint8(path, pre, size).transpose(1, 2, 0)).save(out)
    versions = f"timm {timm.__version__}, Pillow {PIL.__version__}"
    (TIMM_RECORDING / "RECORDED_WITH").write_text(versions + "\n")
    pngs = list(TIMM_RECORDING.rglob("*.png"))
    print(f"{TIMM_RECORDING}: {len(pngs)} crops from {versions}, {sum(p.stat().st_size for p in pngs) / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
