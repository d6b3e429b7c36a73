"""converter.torch_reader: reads what torch.load reads (zip and legacy formats, every dtype,
view and container), refuses pickles that would run code, fails cleanly on damaged files;
and `convert` works without torch, writing the same bytes as the torch-based reading did."""
import argparse
import collections
import datetime
import os
import pickle
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from converter import convert
from converter.api import paddle_target_shapes, save_pdparams
from converter.engine import convert_state_dict
from converter.registry import get_spec
from converter.torch_reader import InertObject, RefusedGlobal, TensorView, TorchFileError, load

from conftest import (RunsShell, assert_no_output, assert_one_line_error, cli, error_lines, file_sha256, run_cli,
                      run_python)

NAME = "fcvit_tiny"
FORMATS = ["zip", "legacy"]
DTYPES = [torch.float32, torch.float16, torch.float64, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


def _save(obj, path, fmt):
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return path


# --- the same tensors and containers as torch.load ---------------------------------------------

def _every_case():
    gen = torch.Generator().manual_seed(0)
    by_dtype = collections.OrderedDict(
        (str(d).replace("torch.", ""), (torch.randn(3, 5, generator=gen) * 50).to(d)) for d in DTYPES)
    base = torch.randn(6, 8, generator=gen)
    with_attribute = torch.randn(3, generator=gen)
    with_attribute.note = "python state"  # saved through _rebuild_from_type_v2
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.randn(2, 2, generator=gen))], lr=0.1, momentum=0.9)
    optimizer.param_groups[0]["params"][0].grad = torch.ones(2, 2)
    optimizer.step()
    return {
        "dtypes": by_dtype,
        "views": {
            "offset": base[2:],
            "strided": base[:, ::3],
            "transposed": base.t(),
            "row": base[4],
            "channels_last": torch.randn(2, 3, 4, 4, generator=gen).contiguous(memory_format=torch.channels_last),
            "half_transposed": base.half().t()[1:],
            "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 4),
        },
        "shared": [base, base[1:3, 2:5]],
        "parameter": torch.nn.Parameter(torch.randn(4, generator=gen)),
        "with_attribute": with_attribute,
        "optimizer": optimizer.state_dict(),
        "args": argparse.Namespace(lr=0.1, model="fcvit_tiny", out=Path("/tmp/out"), sizes=(224, 256)),
        "metric": np.float64(81.5),
        "when": datetime.datetime(2024, 1, 2, 3, 4),
        "plain": [1, 2.5, "text", b"bytes", None, True, (1, 2), {3, 4}, frozenset({5}), 1 + 2j],
        "epoch": 300,
    }


def _assert_same(ours, theirs, where="root"):
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, TensorView), where
        theirs = theirs.detach()
        assert ours.dtype == str(theirs.dtype).replace("torch.", ""), where
        assert (ours.shape, ours.stride, ours.offset) == (tuple(theirs.shape), theirs.stride(),
                                                          theirs.storage_offset()), where
        expected = theirs.view(torch.int16).numpy().view(np.uint16) if theirs.dtype == torch.bfloat16 \
            else theirs.numpy()
        got = ours.numpy()
        assert got.dtype == expected.dtype, where
        assert got.size == 0 or got.strides == expected.strides, where
        np.testing.assert_array_equal(got, expected, err_msg=where)
    elif isinstance(theirs, dict):
        assert type(ours) is type(theirs) and list(ours) == list(theirs), where
        for k in theirs:
            _assert_same(ours[k], theirs[k], f"{where}.{k}")
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _assert_same(a, b, f"{where}[{i}]")
    elif type(theirs).__module__ == "builtins":
        assert type(ours) is type(theirs) and ours == theirs, where
    else:  # training state: an inert placeholder
        assert isinstance(ours, InertObject), where


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_dtype_view_and_container_reads_as_torch_load_does(fmt, tmp_path):
    path = _save(_every_case(), tmp_path / "case.pth", fmt)
    ours, theirs = load(path), torch.load(path, weights_only=False)
    _assert_same(ours, theirs)
    shared = ours["shared"]
    assert shared[0].storage is shared[1].storage  # one record, two views of it
    assert ours["args"].global_name == "argparse.Namespace"
    assert ours["args"].state["lr"] == 0.1 and ours["args"].state["sizes"] == (224, 256)
    assert ours["metric"].global_name.endswith("multiarray.scalar")
    assert ours["when"].global_name == "datetime.datetime"
    assert ours["views"]["scalar"].numpy().shape == () and float(np.asarray(ours["views"]["scalar"])) == 2.5
    np.testing.assert_array_equal(np.asarray(ours["dtypes"]["bfloat16"]),  # widened exactly
                                  theirs["dtypes"]["bfloat16"].float().numpy())


def test_storages_are_read_only_when_a_tensor_is_used(tmp_path):
    """load() reads the pickle only: a damaged storage surfaces when (and only when) its tensor is read."""
    path = _save({"good": torch.ones(1000), "bad": torch.ones(1000)}, tmp_path / "lazy.pth", "zip")
    _flip_byte_in_record(path, "data/1")
    tree = load(path)
    assert np.asarray(tree["good"]).sum() == 1000
    with pytest.raises(TorchFileError, match="CRC-32"):
        tree["bad"].numpy()


# --- the same .pdparams as the torch-based reading ----------------------------------------------

def _with_views(state):
    """The same values in other layouts: Fortran-order and strided views, and biases packed into
    one shared storage, as a checkpoint saved from views would hold them."""
    out, biases = {}, [k for k, v in state.items() if k.endswith(".bias")][:6]
    packed = torch.cat([state[k].flatten() for k in biases] + [torch.zeros(1, dtype=state[biases[0]].dtype)])
    start = 0
    for k, v in state.items():
        if k in biases:
            out[k] = packed[start:start + v.numel()].view(v.shape)
            start += v.numel()
        elif v.ndim == 2:
            out[k] = v.t().contiguous().t()  # Fortran order
        elif v.ndim == 4:
            out[k] = v.contiguous(memory_format=torch.channels_last)
        else:
            out[k] = torch.stack([v, v])[1]  # offset into a storage twice as long
    return out


def _variant(official_checkpoint, tmp_path, variant):
    """(path, entry holding the state dict or None, prefix) of one test checkpoint."""
    src = official_checkpoint(NAME, container="raw")
    state = torch.load(src, weights_only=True)
    if variant == "state_dict":
        return official_checkpoint(NAME), "state_dict", ""
    if variant == "raw-module-prefix":
        return _save({f"module.{k}": v for k, v in state.items()}, tmp_path / "p.pth", "zip"), None, "module."
    if variant == "legacy":
        return _save({"model": state, "epoch": 3}, tmp_path / "legacy.pth", "legacy"), "model", ""
    if variant == "float16":
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    if variant == "bfloat16":
        state = {k: v.bfloat16() if v.is_floating_point() else v for k, v in state.items()}
    if variant == "views":
        state = _with_views(state)
    if variant == "float16-views-legacy":
        state = _with_views({k: v.half() if v.is_floating_point() else v for k, v in state.items()})
        return _save({"state_dict": state}, tmp_path / "h.pth", "legacy"), "state_dict", ""
    return _save({"state_dict": state}, tmp_path / f"{variant}.pth", "zip"), "state_dict", ""


def _convert_with_torch_reading(src, entry, prefix, dst):
    """What convert wrote when it read checkpoints with torch: torch.load (weights-only), then
    tensor.float().numpy() for every non-float32 floating tensor."""
    obj = torch.load(src, map_location="cpu", weights_only=True)
    state = obj[entry] if entry else obj
    arrays = {k[len(prefix):]: (t.float() if t.is_floating_point() else t).numpy() for k, t in state.items()}
    spec = get_spec(NAME)
    params, _ = convert_state_dict(arrays, spec.rules, paddle_target_shapes(spec))
    save_pdparams(params, dst)


@pytest.mark.parametrize("variant", ["state_dict", "raw-module-prefix", "legacy", "float16", "bfloat16", "views",
                                     "float16-views-legacy"])
def test_convert_writes_the_same_bytes_as_the_torch_based_reading(variant, official_checkpoint, tmp_path):
    src, entry, prefix = _variant(official_checkpoint, tmp_path, variant)
    convert(NAME, src, tmp_path / "reader.pdparams")
    _convert_with_torch_reading(src, entry, prefix, tmp_path / "torch.pdparams")
    assert file_sha256(tmp_path / "reader.pdparams") == file_sha256(tmp_path / "torch.pdparams")


# --- safe by construction ------------------------------------------------------------------------

class _Unknown:
    """A class the reader has never heard of, whose constructor has a side effect."""

    def __init__(self, marker, build=False):
        self.marker = marker
        if build:
            Path(marker).touch()

    def __reduce__(self):  # unpickling calls _Unknown(marker, True)
        return (_Unknown, (str(self.marker), True))


def _malicious(kind, marker, state):
    payload = RunsShell(marker) if kind == "os.system" else _Unknown(marker)
    return {"state_dict": state, "payload": payload}


@pytest.mark.parametrize("fmt", FORMATS + ["plain-pickle"])
@pytest.mark.parametrize("kind", ["os.system", "unknown-class"])
def test_a_pickle_that_would_run_code_is_refused_naming_the_global(kind, fmt, official_checkpoint, tmp_path,
                                                                   capsys):
    marker = tmp_path / "pwned"
    state = torch.load(official_checkpoint(NAME), weights_only=True)["state_dict"]
    path = tmp_path / "evil.pth"
    if fmt == "plain-pickle":
        with open(path, "wb") as f:
            pickle.dump(_malicious(kind, marker, {}), f, protocol=2)
    else:
        _save(_malicious(kind, marker, state), path, fmt)
    refused = f"{os.system.__module__}.system" if kind == "os.system" else f"{_Unknown.__module__}._Unknown"
    with pytest.raises(RefusedGlobal, match=refused.replace(".", r"\.")):
        load(path)
    code, _, err = cli(capsys, "convert", NAME, path, tmp_path / "o.pdparams")
    assert_one_line_error(code, err, f"refused global '{refused}'", "--unsafe-pickle")
    assert not marker.exists()
    assert_no_output(tmp_path, keep=["evil.pth"])
    # The payload is live: the explicit torch.load fallback does run it.
    with pytest.warns(UserWarning, match="runs any code"):
        cli(capsys, "convert", NAME, path, tmp_path / "o.pdparams", "--unsafe-pickle")
    assert marker.exists()


def test_refused_modules_are_never_imported(tmp_path, monkeypatch):
    """find_class is a table lookup: naming a module in a pickle does not import it."""
    (tmp_path / "t2p_side_effect.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\nX = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "ref.pth"
    path.write_bytes(b"\x80\x02ct2p_side_effect\nX\nq\x00.")  # PROTO 2, GLOBAL t2p_side_effect.X, STOP
    with pytest.raises(RefusedGlobal, match="t2p_side_effect.X"):
        load(path)
    assert not (tmp_path / "imported").exists() and "t2p_side_effect" not in sys.modules


def test_training_state_objects_are_inert_placeholders_never_built(tmp_path, monkeypatch):
    """A config object (here a yacs CfgNode whose methods would leave a marker) is kept as an
    inert record; none of its code runs, and the weights next to it convert."""
    marker = tmp_path / "built"

    class CfgNode(dict):
        def __setstate__(self, state):
            marker.touch()

        def __setitem__(self, key, value):
            marker.touch()

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    module = types.ModuleType("yacs.config")
    module.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
    monkeypatch.setitem(sys.modules, "yacs.config", module)
    config = dict.__new__(CfgNode)
    dict.update(config, {"MODEL": "crossformer", "LR": 1e-3})
    path = _save({"model": {"w": torch.ones(2)}, "config": config}, tmp_path / "cfg.pth", "zip")
    tree = load(path)
    assert isinstance(tree["config"], InertObject) and tree["config"].global_name == "yacs.config.CfgNode"
    assert tree["config"].items == {"MODEL": "crossformer", "LR": 1e-3}
    assert not marker.exists()


# --- damaged files: one line, exit 2, nothing written ---------------------------------------------

def _record_span(path, suffix):
    """(start, length) in the file of the zip record whose name ends with ``suffix``."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = np.frombuffer(f.read(4), "<u2")
    return info.header_offset + 30 + int(name_length) + int(extra_length), info.file_size


def _flip_byte_in_record(path, suffix):
    start, length = _record_span(path, suffix)
    data = bytearray(Path(path).read_bytes())
    data[start + length // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def _largest_record(path):
    with zipfile.ZipFile(path) as archive:
        return max(archive.infolist(), key=lambda i: i.file_size).filename.split("/", 1)[1]


def _damaged(kind, src, tmp_path):
    path = tmp_path / "bad.pth"
    data = src.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated-zip":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif kind == "truncated-legacy":
        legacy = _save(torch.load(src, weights_only=True), tmp_path / "legacy.tmp", "legacy").read_bytes()
        (tmp_path / "legacy.tmp").unlink()
        path.write_bytes(legacy[: len(legacy) - 1000])
    elif kind in ("corrupted-storage", "corrupted-pickle"):
        path.write_bytes(data)
        _flip_byte_in_record(path, _largest_record(path) if kind == "corrupted-storage" else "data.pkl")
    elif kind == "storage-missing":
        with zipfile.ZipFile(src) as archive, zipfile.ZipFile(path, "w") as out:
            for info in archive.infolist():
                if not info.filename.endswith("/data/0"):
                    out.writestr(info, archive.read(info))
    elif kind == "zip-not-a-checkpoint":
        with zipfile.ZipFile(path, "w") as out:
            out.writestr("readme.txt", "hello")
    return path


@pytest.mark.parametrize("kind", ["empty", "truncated-zip", "truncated-legacy", "corrupted-storage",
                                  "corrupted-pickle", "storage-missing", "zip-not-a-checkpoint"])
def test_damaged_files_are_one_line_errors_and_write_nothing(kind, official_checkpoint, tmp_path, capsys):
    path = _damaged(kind, official_checkpoint(NAME), tmp_path)
    code, _, err = cli(capsys, "convert", NAME, path, tmp_path / "o.pdparams")
    assert_one_line_error(code, err, "bad.pth")
    assert_no_output(tmp_path, keep=["bad.pth"])


def test_a_tensor_running_past_its_storage_is_refused(tmp_path):
    """A pickle may claim any shape: the view is checked against the record before it is read."""
    path = _save({"w": torch.ones(4)}, tmp_path / "w.pth", "zip")
    with zipfile.ZipFile(path) as archive:
        records = {i.filename: archive.read(i) for i in archive.infolist()}
    pkl = next(name for name in records if name.endswith("data.pkl"))
    records[pkl] = records[pkl].replace(b"K\x04\x85", b"K\x40\x85")  # size (4,) -> (64,)
    with zipfile.ZipFile(path, "w") as out:
        for name, data in records.items():
            out.writestr(name, data)
    view = load(path)["w"]
    assert view.shape == (64,)
    with pytest.raises(TorchFileError, match="runs past the end"):
        view.numpy()


# --- without torch -------------------------------------------------------------------------------

BLOCK_TORCH = '''import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "timm", "torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, _NoTorch())
'''


def _python_without_torch(*args):
    """(exit code, stdout, stderr) of ``python ARGS`` in a process where importing torch or timm fails."""
    return run_python(*args, sitecustomize=BLOCK_TORCH)


def _run_without_torch(*args):
    return _python_without_torch("-m", "converter", *args)


def test_convert_and_list_run_where_torch_cannot_be_imported(official_checkpoint, tmp_path):
    code, _, err = _python_without_torch("-c", "import torch")
    assert code != 0 and "blocked by the test" in err
    src = official_checkpoint(NAME)
    code, _, err = _run_without_torch("convert", NAME, src, tmp_path / "no_torch.pdparams")
    assert code == 0, err
    code, _, err = run_cli("convert", NAME, src, tmp_path / "with_torch.pdparams")
    assert code == 0, err
    assert file_sha256(tmp_path / "no_torch.pdparams") == file_sha256(tmp_path / "with_torch.pdparams")
    code, out, err = _run_without_torch("list")
    assert code == 0, err
    assert NAME in out and "crossformer_pp_huge" in out


def test_commands_that_need_torch_say_what_to_install(official_checkpoint):
    code, _, err = _run_without_torch("verify", NAME, "--torch-ckpt", official_checkpoint(NAME))
    assert code == 2 and error_lines(err) == [
        "error: torch2paddle verify needs torch, which the base install leaves out: "
        "pip install 'torch2paddle[verify]'"], err


@pytest.mark.parametrize("payload", [
    b"ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeX\x07\x00\x00\x00float64sb.",  # BUILD: __dict__ update
    b"ctorch\nFloatStorage\nN}X\x05\x00\x00\x00dtypeX\x07\x00\x00\x00float64s\x86b.",  # BUILD: setattr
    b"ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__)s\x86b.",  # a function's defaults
    b"ctorch\nTensor\n}X\x0c\x00\x00\x00__setstate__c__builtin__\nset\nsb.",  # a shared marker
], ids=["storage-dict", "storage-setattr", "function", "marker"])
def test_a_pickle_cannot_alter_the_reader_for_later_files(payload, tmp_path):
    """Everything a pickle can name is immutable to it: BUILD on any of it fails the load, and
    the next file reads exactly as before."""
    (tmp_path / "tamper.pth").write_bytes(b"\x80\x02" + payload)
    with pytest.raises(TorchFileError):
        load(tmp_path / "tamper.pth")
    path = _save({"w": torch.arange(4, dtype=torch.float32)}, tmp_path / "after.pth", "zip")
    np.testing.assert_array_equal(load(path)["w"].numpy(), np.arange(4, dtype=np.float32))


def test_a_whole_pickled_model_needs_the_explicit_torch_load_fallback(official_checkpoint, tmp_path, capsys):
    """torch.save(model) pickles the model's class: refused by the reader, naming it; converted
    (to the same weights) only with --unsafe-pickle, which hands the file to torch.load."""
    model = get_spec(NAME).create_torch()
    model.load_state_dict(torch.load(official_checkpoint(NAME), weights_only=True)["state_dict"])
    torch.save(model, tmp_path / "model.pth")
    code, _, err = cli(capsys, "convert", NAME, tmp_path / "model.pth", tmp_path / "o.pdparams")
    assert_one_line_error(code, err, f"refused global '{type(model).__module__}.{type(model).__name__}'")
    with pytest.warns(UserWarning, match="runs any code"):
        code, out, err = cli(capsys, "convert", NAME, tmp_path / "model.pth", tmp_path / "o.pdparams",
                             "--unsafe-pickle")
    assert code == 0, err
    convert(NAME, official_checkpoint(NAME), tmp_path / "ref.pdparams")
    assert file_sha256(tmp_path / "o.pdparams") == file_sha256(tmp_path / "ref.pdparams")
