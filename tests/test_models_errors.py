"""Bad checkpoints fail with errors that name the problem (file, key, tensor, shapes)."""

import json
import os
import shutil

import numpy as np
import pytest

from jaxrl.models import from_pretrained
from jaxrl.models.hf_io import SafetensorsFile, write_safetensors
from tests.hf_models import make_hf_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("qwen3"))
    make_hf_model("qwen3", directory)
    return directory


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_directory_and_config(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        from_pretrained(str(tmp_path / "nowhere"))
    d = _copy(checkpoint, tmp_path / "noconfig")
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(d)


def test_unsupported_model_type_is_named_with_the_supported_list(tmp_path, checkpoint):
    d = _copy(checkpoint, tmp_path / "gpt2")
    cfg_path = os.path.join(d, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["model_type"] = "gpt2"
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ValueError, match=r"'gpt2'.*llama.*qwen2.*qwen3"):
        from_pretrained(d)


def _rewrite(path, mutate):
    st = SafetensorsFile(path)
    tensors = {name: np.array(st.tensor(name)) for name in st.keys()}
    del st
    mutate(tensors)
    write_safetensors(path, [(n, a.shape, a.dtype, lambda a=a: a) for n, a in tensors.items()])


def test_missing_tensor_is_named(tmp_path, checkpoint):
    d = _copy(checkpoint, tmp_path / "missing")
    _rewrite(os.path.join(d, "model.safetensors"),
             lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(KeyError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight"):
        from_pretrained(d)


def test_misshaped_tensor_names_both_shapes(tmp_path, checkpoint):
    d = _copy(checkpoint, tmp_path / "shape")

    def shrink(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:-1]

    _rewrite(os.path.join(d, "model.safetensors"), shrink)
    with pytest.raises(ValueError, match=r"up_proj\.weight.*\(111, 64\).*\(112, 64\)"):
        from_pretrained(d)


def test_truncated_file(tmp_path, checkpoint):
    d = _copy(checkpoint, tmp_path / "truncated")
    path = os.path.join(d, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match="truncated safetensors file"):
        from_pretrained(d)
    with open(path, "r+b") as f:
        f.truncate(4)
    with pytest.raises(ValueError, match="too short"):
        from_pretrained(d)
