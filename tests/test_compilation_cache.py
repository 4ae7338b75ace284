"""enable_compilation_cache: a second process reuses the first one's compiled programs."""

import os
import subprocess
import sys

import pytest

from jaxrl.kernels.backend import enable_compilation_cache

SCRIPT = """
import sys
import jax, jax.numpy as jnp
from jaxrl.kernels.backend import enable_compilation_cache
enable_compilation_cache(sys.argv[1])
print(float(jax.jit(lambda x: jnp.sin(x) * 3 + jnp.cos(x) ** 2)(jnp.arange(7.0)).sum()))
"""


def _entries(directory):
    return sorted(name for name in os.listdir(directory) if not name.startswith("."))


@pytest.mark.slow
def test_second_process_reuses_the_cache(tmp_path):
    directory = tmp_path / "xla_cache"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = lambda: subprocess.run([sys.executable, "-c", SCRIPT, str(directory)], env=env, check=True,
                                 capture_output=True, text=True).stdout
    first = run()
    written = _entries(directory)
    assert written, "the first process wrote no cache entry"
    assert run() == first
    assert _entries(directory) == written  # nothing new compiled: every program was a hit


def test_bad_path_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="compilation cache path"):
        enable_compilation_cache(blocker / "cache")
