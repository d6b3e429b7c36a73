"""Pair files: any torch model and any Paddle model, with the mapping between them as data.

A pair file (TOML, read with the standard library's ``tomllib``) holds the two model specs with
their keyword arguments, the input size, the eval preprocessing, the mapping rules in the
vocabulary of ``mappings/rules.py`` and a ``[hand]`` section for what a person decided.
``torch2paddle map`` writes one; ``PairSpec`` makes it a registry entry with ``ModelSpec``'s
interface, so ``convert``, ``convert --reverse``, ``verify``, ``diff``, ``eval`` and ``export``
take a pair file wherever they take a model name, through the same engine.
"""
from __future__ import annotations

import json
import math
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from mappings.rules import Drop, Move, Recompute, Rename, Split, Transpose

from .checkpoint import atomic_write, check_output_path
from .errors import UserError
from .registry import EvalPreprocessing, Family
from .specs import ModelRef, build, parse_spec

# timm's load_checkpoint reads 'state_dict', then 'model'; a bare state dict is read as it is.
PAIR = Family("pair", checkpoint_entries=("state_dict", "model"))
DEFAULT_PREPROCESSING = {"input_size": 224, "crop_pct": 0.875, "interpolation": "bicubic",
                         "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
DEFAULT_CLASSES = 1000  # what the API's num_classes defaults to: "as the pair file builds it"


@dataclass(frozen=True, eq=False)
class PairSpec:
    """A pair file as a registry entry (the interface of ``registry.ModelSpec``)."""

    name: str
    path: Optional[Path]
    torch_ref: ModelRef
    paddle_ref: ModelRef
    input_size: int
    preprocessing: EvalPreprocessing
    rules: tuple
    hand: object  # mapper.HandEdits
    num_classes: int = DEFAULT_CLASSES
    checkpoint_entries: tuple = PAIR.checkpoint_entries
    aliases: tuple = ()
    family: Family = PAIR
    dense: None = None
    from_classifier_rules: tuple = ()
    # PaddleClas models do not all build under paddle.LazyGuard (ConvNeXt fails there): layouts and
    # parameter counts come from a real build.
    builds_lazily: bool = False

    @property
    def source(self) -> str:
        return f"{self.torch_ref} -> {self.paddle_ref}"

    def factory_kwargs(self, num_classes: int = DEFAULT_CLASSES, img_size: Optional[int] = None) -> dict:
        """Both models are built as the pair file says; other class counts or sizes need a new map."""
        if num_classes not in (DEFAULT_CLASSES, self.num_classes):
            raise UserError(f"{self.name}: the pair is mapped for {self.num_classes} classes; give num_classes "
                            f"in both specs' kwargs and run map again for {num_classes}")
        if img_size is not None:
            self.check_input_size(img_size, img_size)
        return {}

    def create_torch(self, num_classes: int = DEFAULT_CLASSES, img_size: Optional[int] = None, **model_kwargs):
        self.factory_kwargs(num_classes, img_size)
        return build(self.torch_ref.with_kwargs(**model_kwargs), "torch")

    def create_paddle(self, num_classes: int = DEFAULT_CLASSES, img_size: Optional[int] = None, **model_kwargs):
        self.factory_kwargs(num_classes, img_size)
        return build(self.paddle_ref.with_kwargs(**model_kwargs), "paddle")

    def check_input_size(self, h: int, w: int) -> None:
        if (h, w) != (self.input_size, self.input_size):
            raise UserError(f"{self.name}: the pair is mapped at {self.input_size}x{self.input_size}, not {h}x{w} "
                            f"(run map again with --input-size)")

    def computed_values(self, keys: list) -> dict:
        """The Paddle model's own values of buffers it computes when built (Recompute rules)."""
        state = self.create_paddle().state_dict()
        return {k: state[k].numpy() for k in keys}


# --- reading --------------------------------------------------------------------------------

def load_pair_file(path) -> PairSpec:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such pair file")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a TOML pair file ({exc})") from None
    try:
        return pair_from_toml(data, path)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: not a valid pair file ({type(exc).__name__}: {exc})") from None


def pair_from_toml(data: dict, path: Optional[Path] = None) -> PairSpec:
    from .mapper import HandEdits

    pair, rules = data["pair"], data.get("rules", {})
    prep = {**DEFAULT_PREPROCESSING, **{k: v for k, v in data.get("preprocessing", {}).items() if k != "source"}}
    return PairSpec(
        name=str(pair.get("name") or (path.stem if path else "pair")),
        path=path,
        torch_ref=parse_spec(data["torch"]["spec"], dict(data["torch"].get("kwargs", {}))),
        paddle_ref=parse_spec(data["paddle"]["spec"], dict(data["paddle"].get("kwargs", {}))),
        input_size=int(pair["input_size"]),
        preprocessing=EvalPreprocessing(crop_pct=float(prep["crop_pct"]), input_size=int(prep["input_size"]),
                                        interpolation=str(prep["interpolation"]), mean=tuple(prep["mean"]),
                                        std=tuple(prep["std"])),
        rules=rules_from_toml(rules),
        hand=HandEdits.from_toml(data.get("hand", {})),
        num_classes=int(pair.get("num_classes", DEFAULT_CLASSES)),
        checkpoint_entries=tuple(pair.get("checkpoint_entries", PAIR.checkpoint_entries)),
        aliases=tuple(pair.get("aliases", ())),
    )


def rules_from_toml(rules: dict) -> tuple:
    """The [rules] table as rule objects, in the engine's order of precedence."""
    unknown = set(rules) - {"renames", "moves", "transposes", "drops", "recompute", "splits"}
    if unknown:
        raise ValueError(f"unknown [rules] entries: {', '.join(sorted(unknown))}")
    out = [Rename(*pair) for pair in rules.get("renames", [])]
    out += [Move(*pair) for pair in rules.get("moves", [])]
    out += [Transpose(re.compile(p).pattern) for p in rules.get("transposes", [])]
    out += [Drop(re.compile(d["pattern"]).pattern, d["reason"]) for d in rules.get("drops", [])]
    out += [Recompute(re.compile(d["pattern"]).pattern, d["reason"]) for d in rules.get("recompute", [])]
    out += [Split(d["source"], tuple(d["targets"]), int(d.get("axis", 0))) for d in rules.get("splits", [])]
    return tuple(out)


def read_hand_edits(path: Path):
    """The [hand] section of an existing pair file (or of a file holding only that), for a re-run."""
    from .mapper import HandEdits

    if not path.exists():
        return HandEdits()
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: exists and is not TOML ({exc}); map keeps the [hand] section of the pair "
                        f"file it rewrites, so give a new path or fix the file") from None
    return HandEdits.from_toml(data.get("hand", {}))


# --- writing: a small TOML writer (strings, numbers, booleans, lists, inline tables) ----------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} has no TOML form here")
        return repr(value)
    if isinstance(value, str):
        # Regexes read best as literal strings (no escaping) where TOML allows one.
        if "\\" in value and "'" not in value and "\n" not in value:
            return f"'{value}'"
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot write a {type(value).__name__} to TOML")


def toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def toml_table(name: str, entries: dict, comment: str = "") -> str:
    lines = [f"# {line}" for line in comment.splitlines()] + [f"[{name}]"]
    for key, value in entries.items():
        if isinstance(value, list) and len(value) > 1 and not all(isinstance(v, (int, float)) for v in value):
            lines.append(f"{toml_key(key)} = [")
            lines += [f"    {toml_value(v)}," for v in value]
            lines.append("]")
        else:
            lines.append(f"{toml_key(key)} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def rules_to_toml(rules: tuple) -> dict:
    return {
        "renames": [[r.old, r.new] for r in rules if isinstance(r, Rename)],
        "moves": [[r.pattern, r.replacement] for r in rules if isinstance(r, Move)],
        "transposes": [r.pattern for r in rules if isinstance(r, Transpose)],
        "drops": [{"pattern": r.pattern, "reason": r.reason} for r in rules if isinstance(r, Drop)],
        "recompute": [{"pattern": r.pattern, "reason": r.reason} for r in rules if isinstance(r, Recompute)],
        "splits": [{"source": r.source, "targets": list(r.targets), "axis": r.axis} for r in rules
                   if isinstance(r, Split)],
    }


# --- map ------------------------------------------------------------------------------------

@dataclass
class MapResult:
    name: str
    output: Path
    keys: int  # torch state-dict keys
    paired: int
    transposed: int
    dropped: int
    recomputed: int
    hand_edits: int
    rules: int
    seconds: float
    text: str = field(repr=False, default="")

    def summary(self) -> str:
        return (f"pair         {self.name}\n"
                f"keys         {self.keys} torch keys: {self.paired} paired ({self.transposed} transposed, "
                f"nn.Linear), {self.dropped} dropped; {self.recomputed} Paddle buffers recomputed\n"
                f"rules        {self.rules} (hand edits honoured: {self.hand_edits})\n"
                f"written      {self.output}\n"
                f"time         {self.seconds:.1f} s")


def map_pair(torch_spec: str, paddle_spec: str, output, *, input_size: Optional[int] = None,
             name: Optional[str] = None, seed: int = 0) -> MapResult:
    """Build both models, derive the mapping from one seeded forward of each, write the pair file
    (atomically; an existing file's [hand] section is kept and honoured)."""
    from .mapper import check_complete, compress, derive_keymap, paddle_units, resolve_aliases, torch_units, \
        trace_paddle, trace_torch
    from .specs import timm_preprocessing

    start = time.perf_counter()
    output = check_output_path(output, force=True)  # a re-run rewrites the file, keeping its [hand]
    if output.suffix != ".toml":
        raise UserError(f"{output}: a pair file ends in .toml")
    hand = read_hand_edits(output)
    t_ref, p_ref = parse_spec(torch_spec), parse_spec(paddle_spec)
    torch_model = build(t_ref, "torch")
    preprocessing = timm_preprocessing(torch_model) if t_ref.source == "timm" else None
    size = int(input_size or (preprocessing or DEFAULT_PREPROCESSING)["input_size"])
    preprocessing = {**(preprocessing or DEFAULT_PREPROCESSING), "input_size": size}  # the crop is the input
    paddle_model = build(p_ref, "paddle")
    batch = np.random.default_rng(seed).standard_normal((1, 3, size, size), dtype=np.float32)
    t_units, p_units = torch_units(torch_model), paddle_units(paddle_model)
    try:
        torch_output = trace_torch(torch_model, t_units, batch)
    except Exception as exc:
        raise UserError(f"{t_ref}: forward at {size}x{size} failed: {type(exc).__name__}: {exc}"[:300]) from None
    try:
        trace_paddle(paddle_model, p_units, batch)
    except Exception as exc:
        raise UserError(f"{p_ref}: forward at {size}x{size} failed: {type(exc).__name__}: {exc}"[:300]) from None
    keymap = derive_keymap(t_units, p_units, hand)
    torch_keys, paddle_keys = list(torch_model.state_dict()), list(paddle_model.state_dict())
    resolve_aliases(keymap, torch_model, paddle_model, torch_keys, paddle_keys)
    check_complete(keymap, torch_keys, paddle_keys)
    rules = compress(keymap)
    num_classes = _classes(torch_output)
    name = name or output.stem
    text = pair_file_text(name, t_ref, p_ref, size, num_classes, preprocessing, rules, hand, keymap, len(torch_keys))
    atomic_write(output, lambda tmp: tmp.write_text(text))
    return MapResult(name, output, len(torch_keys), len(keymap.pairs), len(keymap.transposed), len(keymap.drops),
                     len(keymap.recomputed), hand.count, len(rules), time.perf_counter() - start, text)


def _classes(output) -> int:
    """The class count of a classifier's (batch, classes) logits; the default for anything else."""
    import torch

    return int(output.shape[-1]) if isinstance(output, torch.Tensor) and output.ndim == 2 else DEFAULT_CLASSES


def pair_file_text(name, t_ref, p_ref, size, num_classes, preprocessing, rules, hand, keymap, n_keys) -> str:
    parts = [
        "# A torch2paddle pair file, written by `torch2paddle map` from one seeded forward of both models.\n"
        "# Review it and commit it. Hand edits go in [hand]: `map` keeps and honours them when run again.\n"
        f"# {n_keys} torch keys: {len(keymap.pairs)} paired ({len(keymap.transposed)} transposed nn.Linear weights), "
        f"{len(keymap.drops)} dropped; {len(keymap.recomputed)} Paddle buffers recomputed; {hand.count} hand edits.\n",
        toml_table("pair", {"name": name, "input_size": size, "num_classes": num_classes,
                            "checkpoint_entries": list(PAIR.checkpoint_entries)}),
        toml_table("torch", {"spec": t_ref.spec, "kwargs": t_ref.kwargs}),
        toml_table("paddle", {"spec": p_ref.spec, "kwargs": p_ref.kwargs}),
        toml_table("preprocessing", {"source": "timm pretrained_cfg" if t_ref.source == "timm"
                                     else "default (ImageNet)",
                                     **preprocessing},
                   "Eval preprocessing (eval, verify --images, export's metadata)."),
        toml_table("rules", rules_to_toml(rules),
                   "moves: torch module path -> Paddle module path ({i} matches a number), applied before the\n"
                   "tensor renames; transposes: nn.Linear weights (torch (out, in) -> Paddle (in, out));\n"
                   "recompute: Paddle buffers no torch tensor fills, taken from the freshly built Paddle model;\n"
                   "splits: one torch tensor cut into several Paddle ones (fused qkv against q, k, v)."),
        toml_table("hand", {"modules": hand.modules, "keys": hand.keys, "drops": hand.drops, "splits": hand.splits},
                   "Hand edits: modules = [[torch module, paddle module]], keys = [[torch key, paddle key]],\n"
                   "drops = [[torch key, reason]], splits = [[torch key, [paddle keys]]] (cut along torch axis 0)."),
    ]
    return "\n".join(parts)
