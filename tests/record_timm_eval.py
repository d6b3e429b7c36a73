"""Record timm's eval transform on the test images into tests/data/timm_eval_recording.npz.

test_eval.py holds our preprocessing to this recording, so the comparison also runs where timm
cannot be imported.  Re-record, where timm imports (pip install -e '.[timm]'), with

    python tests/record_timm_eval.py

test_recording_is_what_timm_gives then fails until the recording matches the installed timm.
"""
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import conftest  # noqa: E402,F401  (puts the repository on sys.path)
from test_eval import TIMM_RECORDING, recorded_cases, timm_eval_uint8  # noqa: E402


def main() -> None:
    import PIL
    import timm

    with tempfile.TemporaryDirectory() as tmp:
        crops = {key: timm_eval_uint8(path, pre, size) for key, (path, pre, size) in recorded_cases(Path(tmp)).items()}
    versions = np.array(f"timm {timm.__version__}, Pillow {PIL.__version__}")
    np.savez_compressed(TIMM_RECORDING, _recorded_with=versions, **crops)
    print(f"{TIMM_RECORDING}: {len(crops)} crops from {versions}, {TIMM_RECORDING.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
