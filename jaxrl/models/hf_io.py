"""HuggingFace safetensors <-> jaxrl parameters, and the tokenizer.

Reading memory-maps each .safetensors file (our own small header parser: numpy has no
bfloat16, so the usual numpy loader cannot read bf16 checkpoints) and builds every parameter
with ``jax.make_array_from_callback``: each device shard is sliced from the mapped file,
transposed and cast on its own, so no second full host copy of the model is ever made and
parameters land directly in their target sharding.

Writing streams one tensor at a time into files whose tensor names, shapes and layout are
exactly those of ``transformers``' own ``save_pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct as _struct
from typing import Any, Iterator

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils

from jaxrl.models.config import ModelConfig
from jaxrl.models.sharding import param_shapes, param_shardings
from jaxrl.models.transformer import Params, Transformer, model_params

_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
)

# jaxrl block param -> (HF name under model.layers.{i}., transpose?)
_BLOCK_TO_HF = {
    "attn_norm": ("input_layernorm.weight", False),
    "q_proj": ("self_attn.q_proj.weight", True),
    "k_proj": ("self_attn.k_proj.weight", True),
    "v_proj": ("self_attn.v_proj.weight", True),
    "o_proj": ("self_attn.o_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False),
    "k_bias": ("self_attn.k_proj.bias", False),
    "v_bias": ("self_attn.v_proj.bias", False),
    "o_bias": ("self_attn.o_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "gate_proj": ("mlp.gate_proj.weight", True),
    "up_proj": ("mlp.up_proj.weight", True),
    "down_proj": ("mlp.down_proj.weight", True),
    "gate_bias": ("mlp.gate_proj.bias", False),
    "up_bias": ("mlp.up_proj.bias", False),
    "down_bias": ("mlp.down_proj.bias", False),
}


# --------------------------------------------------------------------------- safetensors files
class SafetensorsFile:
    """Memory-mapped read-only view of one .safetensors file."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"{path}: not a safetensors file (too short)")
            (header_len,) = _struct.unpack("<Q", head)
            if header_len > os.path.getsize(path) - 8:
                raise ValueError(f"{path}: truncated safetensors file (header length {header_len})")
            try:
                header = json.loads(f.read(header_len))
            except ValueError as e:
                raise ValueError(f"{path}: corrupt safetensors header: {e}") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self._data_start = 8 + header_len
        needed = self._data_start + max((e["data_offsets"][1] for e in header.values()), default=0)
        size = os.path.getsize(path)
        if size < needed:
            raise ValueError(
                f"{path}: truncated safetensors file ({size} bytes, the header describes {needed})"
            )
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")

    def keys(self) -> list[str]:
        return list(self.entries)

    def tensor(self, name: str) -> np.ndarray:
        """Zero-copy numpy view of a tensor (slicing it reads only the touched pages)."""
        entry = self.entries[name]
        if entry["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        raw = self._mm[self._data_start + start:self._data_start + end]
        return raw.view(_ST_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def open_checkpoint(path: str) -> dict[str, SafetensorsFile]:
    """Map every tensor name of an HF directory to its (memory-mapped) file.

    Handles a single ``model.safetensors`` and sharded ``model.safetensors.index.json``.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory not found: {path}")
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files: dict[str, SafetensorsFile] = {}
        out = {}
        for name, filename in weight_map.items():
            full = os.path.join(path, filename)
            if filename not in files:
                if not os.path.isfile(full):
                    raise FileNotFoundError(f"{index} names {filename}, which does not exist")
                files[filename] = SafetensorsFile(full)
            out[name] = files[filename]
        return out
    if os.path.isfile(single):
        st = SafetensorsFile(single)
        return {name: st for name in st.keys()}
    raise FileNotFoundError(
        f"{path} has neither model.safetensors nor model.safetensors.index.json"
    )


def write_safetensors(path: str, tensors: list[tuple[str, tuple[int, ...], np.dtype, Any]],
                      metadata: dict[str, str] | None = None) -> None:
    """Stream tensors to a .safetensors file.

    tensors: (name, shape, dtype, fetch) with ``fetch()`` returning the array when it is
    written, so only one tensor is on the host at a time.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype, _ in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _ST_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(_struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, fetch in tensors:
            arr = np.ascontiguousarray(np.asarray(fetch(), dtype=dtype))
            if arr.shape != tuple(shape):
                raise ValueError(f"tensor {name}: expected shape {shape}, got {arr.shape}")
            f.write(arr.tobytes())


# --------------------------------------------------------------------------- name mapping
def hf_tensor_names(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], int | None, bool]]:
    """HF tensor name -> (jaxrl param path, layer index or None, transposed?) in HF order."""
    out = [("model.embed_tokens.weight", ("embed",), None, False)]
    block_names = list(param_shapes(cfg)["blocks"])
    for layer in range(cfg.num_layers):
        for name in block_names:
            hf_name, transpose = _BLOCK_TO_HF[name]
            out.append((f"model.layers.{layer}.{hf_name}", ("blocks", name), layer, transpose))
    out.append(("model.norm.weight", ("final_norm",), None, False))
    if not cfg.tie_word_embeddings:
        out.append(("lm_head.weight", ("lm_head",), None, True))
    return out


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


# --------------------------------------------------------------------------- loading
def _param_sources(cfg: ModelConfig, files: dict[str, SafetensorsFile]):
    """jaxrl param path -> list of (file, hf name, transpose) (one per layer for blocks)."""
    sources: dict[tuple[str, ...], list] = {}
    for hf_name, path, layer, transpose in hf_tensor_names(cfg):
        if hf_name not in files:
            raise KeyError(f"checkpoint is missing tensor {hf_name!r} (needed for {'.'.join(path)})")
        sources.setdefault(path, []).append((files[hf_name], hf_name, transpose))
    return sources


def _check_shape(st: SafetensorsFile, hf_name: str, expected: tuple[int, ...]):
    got = tuple(st.entries[hf_name]["shape"])
    if got != expected:
        raise ValueError(f"{st.path}: tensor {hf_name!r} has shape {got}, config implies {expected}")


def _read_slice(st: SafetensorsFile, hf_name: str, transpose: bool, index: tuple[slice, ...]):
    """Read ``index`` (in jaxrl layout) of one HF tensor."""
    t = st.tensor(hf_name)
    if transpose:
        return t[index[1], index[0]].T if len(index) == 2 else t[index[::-1]].T
    return t[index]


def from_pretrained(path: str, *, dtype: str | None = None, param_dtype: str | None = None,
                    mesh: jax.sharding.Mesh | None = None, rules=None,
                    **config_overrides) -> tuple[Transformer, ModelConfig]:
    """Load a local HF directory (config.json + safetensors) into a Transformer.

    dtype: compute dtype ("float32" | "bfloat16"); param_dtype: storage dtype (default
    float32 so optimizer updates are exact; pass "bfloat16" for inference). With a ``mesh``,
    every parameter is created directly in the sharding given by its logical axes and
    ``rules`` (see jaxrl.models.sharding); otherwise on the default device.
    """
    cfg = ModelConfig.from_hf(path, **config_overrides)
    changes = {}
    if dtype is not None:
        changes["dtype"] = dtype
    if param_dtype is not None:
        changes["param_dtype"] = param_dtype
    cfg = cfg.replace(**changes) if changes else cfg
    files = open_checkpoint(path)
    sources = _param_sources(cfg, files)
    shapes = param_shapes(cfg)
    shardings = param_shardings(cfg, mesh, rules) if mesh is not None else None
    target_dtype = np.dtype(ml_dtypes.bfloat16) if cfg.param_dtype == "bfloat16" else np.dtype(cfg.param_dtype)
    params: Params = {}
    for path_key, parts in sources.items():
        shape = tuple(_get(shapes, path_key))
        stacked = path_key[0] == "blocks"
        per_tensor = shape[1:] if stacked else shape
        for st, hf_name, transpose in parts:
            _check_shape(st, hf_name, per_tensor[::-1] if transpose else per_tensor)

        def read(index, parts=parts, stacked=stacked, shape=shape):
            index = tuple(index) + (slice(None),) * (len(shape) - len(index))
            if stacked:
                layers = range(shape[0])[index[0]]
                arr = np.stack([_read_slice(*parts[i], index[1:]) for i in layers])
            else:
                arr = _read_slice(*parts[0], index)
            return np.asarray(arr).astype(target_dtype)

        sharding = (_get(shardings, path_key) if shardings is not None
                    else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        _set(params, path_key, jax.make_array_from_callback(shape, sharding, read))
    with open(os.path.join(path, "config.json")) as f:
        hf_config = json.load(f)
    metadata = json.dumps({"hf_config": hf_config, "source_dir": os.path.abspath(path)})
    return Transformer(cfg, params=params, hf_metadata=metadata), cfg


# --------------------------------------------------------------------------- saving
def _host_array(x: jax.Array) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def save_pretrained(model: Transformer, path: str, *, max_shard_bytes: int = 5 * 2**30,
                    dtype: str | None = None) -> None:
    """Write config.json + safetensors (+ tokenizer files of the source dir) to ``path``.

    The result loads with ``transformers.AutoModelForCausalLM.from_pretrained(path)`` and
    with ``from_pretrained``. Tensors are written in ``dtype`` (default the param dtype),
    sharded into files of at most ``max_shard_bytes`` with an index when needed. Under
    multi-host only process 0 writes; every process must call this (gathers are collective).
    """
    cfg = model.config
    params = model_params(model)
    out_dtype = dtype or cfg.param_dtype
    np_dtype = np.dtype(ml_dtypes.bfloat16) if out_dtype == "bfloat16" else np.dtype(out_dtype)
    names = hf_tensor_names(cfg)
    write = jax.process_index() == 0
    if write:
        os.makedirs(path, exist_ok=True)

    def fetcher(param_path, layer, transpose):
        def fetch():
            arr = _get(params, param_path)
            arr = arr[layer] if layer is not None else arr
            host = _host_array(arr)
            return host.T if transpose else host
        return fetch

    entries = []
    for hf_name, param_path, layer, transpose in names:
        shape = tuple(_get(params, param_path).shape)
        shape = shape[1:] if layer is not None else shape
        shape = shape[::-1] if transpose else shape
        entries.append((hf_name, shape, np_dtype, fetcher(param_path, layer, transpose)))

    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = int(np.prod(entry[1], dtype=np.int64)) * np_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    if not write:  # other processes still take part in the collective gathers
        for shard in shards:
            for entry in shard:
                entry[3]()
        return
    if len(shards) == 1:
        write_safetensors(os.path.join(path, "model.safetensors"), shards[0])
    else:
        weight_map = {}
        total = 0
        for i, shard in enumerate(shards):
            filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(path, filename), shard)
            for name, shape, _, _ in shard:
                weight_map[name] = filename
                total += int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(single):
            os.remove(single)

    meta = model.metadata
    hf_config = cfg.to_hf(meta.get("hf_config"))
    hf_config["torch_dtype"] = out_dtype
    hf_config.pop("dtype", None)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    source = meta.get("source_dir")
    if source and os.path.isdir(source) and os.path.abspath(source) != os.path.abspath(path):
        for name in TOKENIZER_FILES:
            src = os.path.join(source, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(path, name))


def load_tokenizer(path: str | os.PathLike):
    """``transformers.AutoTokenizer`` from a local tokenizer directory (never the hub)."""
    # transformers takes seconds to import: only callers that load a tokenizer pay for it.
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    known_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.isfile(os.path.join(path, name)) for name in known_files):
        raise FileNotFoundError(f"no tokenizer files ({', '.join(known_files)}) in {path}")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def iter_hf_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Every (name, array view) of an HF checkpoint directory (for inspection and tests)."""
    for name, st in open_checkpoint(path).items():
        yield name, st.tensor(name)
