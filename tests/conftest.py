"""Shared fixtures: official-format checkpoints with seeded random weights, built once per
session and reused by every test that needs the same model."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = Path(__file__).parent / "data" / "manifests"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("GLOG_minloglevel", "2")  # Paddle's C++ warnings would drown test output


def _timm_imports() -> bool:
    from reference_torch.registration import timm_registration_active

    return timm_registration_active()


# timm (and the torchvision it imports) is an optional extra; on CPU-only machines its torchvision
# needs the CUDA build of torch.  Tests of the timm integration run wherever it imports.
requires_timm = pytest.mark.skipif(not _timm_imports(), reason="timm/torchvision do not import here "
                                   "(optional extra: pip install 'torch2paddle[timm]')")


def load_manifest(name: str) -> dict:
    return json.loads((MANIFESTS / f"{name}.json").read_text())


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def official_checkpoint(checkpoint_dir):
    """official_checkpoint(name, **kw) -> path of a seeded official-format checkpoint (cached)."""
    from converter.fixtures import make_official_checkpoint

    cache = {}

    def build(name: str, suffix: str = ".pth", **kwargs) -> Path:
        tag = "-".join(f"{k}={v}" for k, v in sorted(kwargs.items()))
        key = (name, suffix, tag)
        if key not in cache:
            path = checkpoint_dir / f"{name}{('-' + tag) if tag else ''}{suffix}"
            cache[key] = make_official_checkpoint(name, path, **kwargs)
        return cache[key]

    return build


def run_cli(*args) -> tuple:
    """Run the CLI in a subprocess, as a user would: (exit code, stdout, stderr)."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "converter", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    return proc.returncode, proc.stdout, proc.stderr


def error_lines(stderr: str) -> list:
    """stderr lines that are ours (Paddle/torch may print import-time warnings)."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]
