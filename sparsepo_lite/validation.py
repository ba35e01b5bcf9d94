"""Checks of configuration values, shared by every config class: one message style, raised before
anything is loaded; and the reader of YAML config files, which refuses a repeated key."""

from __future__ import annotations

import math
from typing import Optional


def check_number(
    name: str,
    value,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    optional: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite number in the range.

    ``low``/``high`` bound it (inclusive, or exclusive with ``low_open``/``high_open``);
    ``integer`` also requires an int; ``optional`` lets ``None`` through.
    """
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")


#: The largest seed: numpy's generators (which transformers.set_seed seeds) take 32 bits.
MAX_SEED = 2**32 - 1


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def load_yaml(path: str):
    """The YAML document in ``path`` (plain values only, as ``yaml.safe_load``), or ``ValueError``
    naming the file: for YAML that does not parse, a file that is not UTF-8, and a mapping that
    repeats a key, which ``safe_load`` would read silently as its last value."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                first_line = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' may be overridden
                        continue
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        if key in first_line:
                            raise ValueError(f"{path}: key {key!r} appears twice (lines {first_line[key]} and {line})")
                        first_line[key] = line
                    except TypeError:  # an unhashable key: safe_load's own error names it
                        pass
            return super().construct_mapping(node, deep=deep)

    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=UniqueKeyLoader)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not valid YAML (not UTF-8, byte {exc.start})") from None
    except yaml.YAMLError as exc:
        # one line, with the place: the error's own text spans several lines
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}: not valid YAML ({getattr(exc, 'problem', None) or exc}{where})") from None


def load_json(path: str):
    """The JSON document in ``path``, or ``ValueError`` naming the file when it cannot be read or
    parsed."""
    import json

    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None


def check_finite_tensors(path: str, tensors) -> None:
    """Raise ``ValueError`` naming the file ``path`` and the tensor when a floating tensor of
    ``tensors`` (name -> tensor, as read from a safetensors file) holds a NaN or an inf: weights
    like that load silently and turn every output into NaN."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise ValueError(f"{path}: {name} holds a non-finite value (NaN or inf)")
