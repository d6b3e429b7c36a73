"""Shared fixtures and helpers: official-format checkpoints with seeded random weights, built
once per session and reused by every test that needs the same model; running the CLI (in
process or as a real process) and checking its errors."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = Path(__file__).parent / "data" / "manifests"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("GLOG_minloglevel", "2")  # Paddle's C++ warnings would drown test output

MAX_ABS_ERR = 1e-5  # the user's gate is 1e-4; we hold ourselves ten times tighter
ONE_PER_FAMILY = ["fcvit_tiny", "biformer_tiny", "crossformer_tiny", "regionvit_tiny"]


def _timm_imports() -> bool:
    from reference_torch.registration import timm_registration_active

    return timm_registration_active()


# timm (and the torchvision it imports) is an optional extra; on CPU-only machines its torchvision
# needs the CUDA build of torch.  Tests of the timm integration run wherever it imports.
requires_timm = pytest.mark.skipif(not _timm_imports(), reason="timm/torchvision do not import here "
                                   "(optional extra: pip install 'torch2paddle[timm]')")


def load_manifest(name: str) -> dict:
    """The official layout of a model: tests/data/manifests/<name>.json, dense backbones under dense/."""
    path = MANIFESTS / f"{name}.json"
    return json.loads((path if path.is_file() else MANIFESTS / "dense" / f"{name}.json").read_text())


def has_manifest(name: str) -> bool:
    return (MANIFESTS / f"{name}.json").is_file() or (MANIFESTS / "dense" / f"{name}.json").is_file()


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def official_checkpoint(tmp_path_factory):
    """official_checkpoint(name, **kw) -> path of a seeded official-format checkpoint (cached)."""
    from converter.fixtures import make_official_checkpoint

    checkpoint_dir = tmp_path_factory.mktemp("checkpoints")
    cache = {}

    def build(name: str, suffix: str = ".pth", **kwargs) -> Path:
        tag = "-".join(f"{k}={v}" for k, v in sorted(kwargs.items()))
        key = (name, suffix, tag)
        if key not in cache:
            path = checkpoint_dir / f"{name}{('-' + tag) if tag else ''}{suffix}"
            cache[key] = make_official_checkpoint(name, path, **kwargs)
        return cache[key]

    return build


@pytest.fixture
def restore_registry():
    """Pair files a test registers (by name, in MODELS) leave with it."""
    from converter import registry

    models, aliases = dict(registry.MODELS), dict(registry.ALIASES)
    yield
    for table, saved in ((registry.MODELS, models), (registry.ALIASES, aliases)):
        table.clear()
        table.update(saved)


# --- running the CLI -----------------------------------------------------------------------------

def cli(capsys, *args) -> tuple:
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    from converter.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def run_python(*args, sitecustomize: Optional[str] = None, check: bool = False) -> tuple:
    """Run ``python ARGS`` in a subprocess from the repository root: (exit code, stdout, stderr).
    ``sitecustomize``: source the interpreter runs at start-up (e.g. to block an import)."""
    with tempfile.TemporaryDirectory() as site:
        path = [str(ROOT)]
        if sitecustomize is not None:
            Path(site, "sitecustomize.py").write_text(sitecustomize)
            path.insert(0, site)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env,
                              cwd=ROOT, check=check)
    return proc.returncode, proc.stdout, proc.stderr


def run_cli(*args) -> tuple:
    """Run the CLI in a subprocess, as a user would: (exit code, stdout, stderr)."""
    return run_python("-m", "converter", *args)


def error_lines(stderr: str) -> list:
    """stderr lines that are ours (Paddle/torch may print import-time warnings)."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_line_error(code, err, *fragments, expected_code=2):
    assert code == expected_code, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_no_output(directory, keep=()):
    leftovers = [p.name for p in directory.iterdir() if p.name not in keep]
    assert leftovers == [], leftovers


class RunsShell:
    """A pickle payload that runs a shell command when unpickled (it touches ``marker``)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
