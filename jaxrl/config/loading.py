"""Loading a config: experiment file (or shipped recipe name) + ``--config.k=v`` overrides.

Overrides are typed by the existing value (``--config.rl.samples_per_prompt=abc`` fails
naming the key). The config is locked: an unknown key (a typo) is an error naming the key
and the closest existing one. Every error is a ``ConfigError`` with one line.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import re
from typing import Any, Mapping, Sequence

import ml_collections
from ml_collections import config_dict

import configs
from jaxrl.config.defaults import ConfigError, base_config
from jaxrl.config.validation import validate


def resolve_config_path(name: str) -> str:
    """A config file path: ``name`` itself when it exists, else a shipped recipe of the
    installed ``configs`` package (``default``, ``configs/default.py`` and ``default.py`` all
    name ``configs/default.py``), so a run starts from any directory. ConfigError if neither."""
    if os.path.isfile(name):
        return name
    stem = os.path.splitext(os.path.basename(name))[0]
    shipped = os.path.join(os.path.dirname(os.path.abspath(configs.__file__)), f"{stem}.py")
    if os.path.dirname(name) in ("", "configs") and os.path.isfile(shipped):
        return shipped
    raise ConfigError(f"config file not found: {name}")


def resolve_model_path(path: str) -> str:
    """``path`` itself when it exists; else, for a relative path, the same path under the
    directory the ``configs`` package is installed in (the repository, or site-packages where
    the embedded ``assets/default_model`` is shipped), so the default runs from any directory."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(configs.__file__))), path)
    return shipped if os.path.exists(shipped) else path


def _import_config_file(path: str) -> ml_collections.ConfigDict:
    path = resolve_config_path(path)
    spec = importlib.util.spec_from_file_location(f"_jaxrl_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ConfigError:
        raise
    except SyntaxError as error:
        raise ConfigError(f"{path}:{error.lineno}: syntax error: {error.msg}") from None
    except Exception as error:  # NameError, ImportError, ...: the user's file, one line
        raise ConfigError(f"{path}{_line_of(error, path)}: {type(error).__name__}: {_short(error)}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} does not define get_config()")
    try:
        cfg = module.get_config()
    except ConfigError:
        raise
    except (AttributeError, KeyError, TypeError) as error:
        raise ConfigError(f"{path}{_line_of(error, path)}: get_config(): {_describe_locked_error(error)}") from None
    except Exception as error:
        raise ConfigError(f"{path}{_line_of(error, path)}: get_config(): {type(error).__name__}: "
                          f"{_short(error)}") from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    return cfg


def _line_of(error: BaseException, path: str) -> str:
    """``":<line>"`` of the innermost frame of ``error`` inside ``path`` ("" if none)."""
    line = ""
    tb = error.__traceback__
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
            line = f":{tb.tb_lineno}"
        tb = tb.tb_next
    return line


def _dotted_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key in cfg.keys():
        keys.append(prefix + key)
        if isinstance(cfg[key], ml_collections.ConfigDict):
            keys.extend(_dotted_keys(cfg[key], prefix + key + "."))
    return keys


def _describe_locked_error(error: BaseException) -> str:
    """'unknown config key 'x'; did you mean 'a.b.y'?' for ml_collections' locked-key error."""
    match = re.search(r'Key "([^"]+)" does not exist', str(error))
    if not match:
        return _short(error)
    name = match.group(1)
    known = _dotted_keys(base_config())
    leaf_to_dotted = {}
    for dotted in known:
        leaf_to_dotted.setdefault(dotted.split(".")[-1], dotted)
    hint = difflib.get_close_matches(name, list(leaf_to_dotted), n=1)
    suggestion = f"; did you mean {leaf_to_dotted[hint[0]]!r}?" if hint else ""
    return f"unknown config key {name!r}{suggestion}"


def _short(error: BaseException) -> str:
    text = str(error).split("Other fields present")[0].strip().rstrip(".,")
    return text.strip("'\"")


def _lookup_parent(cfg: ml_collections.ConfigDict, dotted: str) -> tuple[ml_collections.ConfigDict, str]:
    """The ConfigDict holding ``dotted``'s last part; an unknown part is a ConfigError."""
    parts = dotted.split(".")
    node = cfg
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[: depth + 1])
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            keys = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            hint = difflib.get_close_matches(part, keys, n=1)
            suggestion = f"; did you mean {'.'.join(parts[:depth] + [hint[0]])!r}?" if hint else ""
            raise ConfigError(f"unknown config key {prefix!r}{suggestion}")
        if depth < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def _coerce(key: str, text: str, current: Any) -> Any:
    """Parses override ``text`` to the type of ``current`` (the base value)."""
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"config key {key!r} is a section; override one of its fields")
    if isinstance(current, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"config key {key!r} expects true/false, got {text!r}")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"config key {key!r} expects an integer, got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"config key {key!r} expects a number, got {text!r}") from None
    if isinstance(current, (tuple, list)):
        stripped = text.strip()
        if stripped.startswith(("[", "(")):
            try:
                value = ast.literal_eval(stripped)
            except (ValueError, SyntaxError):
                raise ConfigError(f"config key {key!r} expects a list, got {text!r}") from None
            return tuple(value)
        return tuple(part.strip() for part in stripped.split(",") if part.strip())
    return text


def apply_override(cfg: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Sets ``cfg.<dotted>`` from its command-line text, typed by the existing value."""
    parent, leaf = _lookup_parent(cfg, dotted)
    field = parent.get_ref(leaf) if isinstance(parent._fields.get(leaf), config_dict.FieldReference) else None
    current = parent[leaf]
    if current is None and field is not None:
        kind = field.get_type()
        value: Any = text if kind is str else _coerce(dotted, text, kind())
        if text.strip().lower() in ("none", "null"):
            value = None
    else:
        value = _coerce(dotted, text, current)
    try:
        parent[leaf] = value
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config key {dotted!r}: {_short(error)}") from None


def parse_overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
    """``["--config.a.b=1", "--config.c", "x"]`` → ``[("a.b", "1"), ("c", "x")]``."""
    pairs = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if not arg.startswith("--config."):
            raise ConfigError(f"unrecognised argument {arg!r} (overrides look like --config.rl.lr=1e-6)")
        body = arg[len("--config."):]
        if "=" in body:
            key, value = body.split("=", 1)
        else:
            if index + 1 >= len(argv):
                raise ConfigError(f"override {arg!r} has no value")
            key, value = body, argv[index + 1]
            index += 1
        pairs.append((key, value))
        index += 1
    return pairs


def load_config(path: str | None, overrides: Sequence[tuple[str, str]] | Sequence[str] = (), *,
                check_files: bool = True) -> ml_collections.ConfigDict:
    """Experiment file (``get_config()``; None = the base config) + overrides, validated.

    ``overrides`` are ``(dotted_key, text)`` pairs or raw ``--config.k=v`` arguments.
    ``check_files=False`` skips the checks that the model and data files exist (a memory
    plan needs neither on this machine).
    Raises ConfigError naming the key or file.
    """
    cfg = base_config() if path is None else _import_config_file(path)
    _check_against_base(cfg, base_config(), "")
    cfg.lock()
    if overrides and isinstance(overrides[0], str):
        overrides = parse_overrides(overrides)  # type: ignore[arg-type]
    for key, text in overrides:
        apply_override(cfg, key, text)
    cfg.model.path = resolve_model_path(cfg.model.path)
    validate(cfg, check_files=check_files)
    return cfg


def _check_against_base(cfg, base, prefix: str) -> None:
    """An experiment file may only change keys of the base config (catches typos)."""
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in base:
            hint = difflib.get_close_matches(key, list(base.keys()), n=1)
            suggestion = f"; did you mean {prefix + hint[0]!r}?" if hint else ""
            raise ConfigError(f"unknown config key {name!r}{suggestion}")
        if isinstance(base[key], ml_collections.ConfigDict):
            if not isinstance(cfg[key], ml_collections.ConfigDict):
                raise ConfigError(f"config key {name!r} must be a section")
            _check_against_base(cfg[key], base[key], name + ".")
    for key in base.keys():
        if key not in cfg:
            raise ConfigError(f"config is missing key {prefix + key!r} (start from jaxrl.config.base_config())")


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """Rebuilds a config from ``config.json`` of a run directory (validated against the base)."""
    data = json.loads(text)
    cfg = base_config()

    def fill(node, values, prefix):
        for key, value in values.items():
            name = prefix + key
            if key not in node:
                raise ConfigError(f"unknown config key {name!r} in saved config")
            if isinstance(node[key], ml_collections.ConfigDict):
                fill(node[key], value, name + ".")
            else:
                node[key] = tuple(value) if isinstance(value, list) else value

    fill(cfg, data, "")
    return cfg


# Keys that may change between a run and its resumption without changing the experiment:
# where and how it runs, logs, evaluates and checkpoints, and how long it runs. A key or a
# section prefix (ending in ".").
RESUME_NEUTRAL_KEYS = (
    "run.root", "train.num_steps", "train.max_bad_steps", "checkpoint.", "logging.", "eval.", "mesh.",
    "distributed.", "rewards.num_workers", "rewards.timeout_s", "sampling.max_rows_per_call", "model.remat",
)


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(stored: Mapping[str, Any], cfg: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
    """Keys that change the experiment and differ: dotted key -> (stored value, new value).

    stored: the run's saved config (the parsed RUN_DIR/config.json). Keys in
    ``RESUME_NEUTRAL_KEYS`` are ignored; values are compared in their JSON form.
    """
    old, new = _flatten(stored), _flatten(json.loads(to_json(cfg)))
    changes = {}
    for key in sorted(set(old) | set(new)):
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_NEUTRAL_KEYS):
            continue
        if old.get(key) != new.get(key):
            changes[key] = (old.get(key), new.get(key))
    return changes


def to_json(cfg: ml_collections.ConfigDict) -> str:
    """The resolved config as indented JSON (written to RUN_DIR/config.json)."""
    return cfg.to_json(indent=2, sort_keys=True)
