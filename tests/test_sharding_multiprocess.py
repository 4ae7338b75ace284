"""Two processes x 4 CPU devices (jax.distributed, gloo) train like one process x 8 devices."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from jaxrl.models.transformer import init_params
from tests.sharding_common import TINY

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "sharding_multiprocess_script.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    fast_compile = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {fast_compile}",
                JAX_PLATFORMS="cpu")


def test_two_processes_reach_the_single_process_parameters(tmp_path):
    single_out, multi_out = tmp_path / "single.npz", tmp_path / "multi.npz"
    port = _free_port()
    # All three processes run at once; the single-process reference is independent.
    procs = [subprocess.Popen([sys.executable, SCRIPT, str(single_out)], env=_env(8),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    procs += [subprocess.Popen([sys.executable, SCRIPT, str(multi_out), str(port), str(i)],
                               env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for i in range(2)]
    try:
        outputs = [p.communicate(timeout=540)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-4000:]
    assert "process 0/2 local_devices=4" in outputs[1] and "process 1/2 local_devices=4" in outputs[2]

    single, multi = np.load(single_out), np.load(multi_out)
    assert set(single.files) == set(multi.files)
    # parameters are really sharded over the 2x2x2 mesh: q_proj [2, 32, 32] -> [2, 16, 16]
    assert list(multi["q_proj_shard"]) == [2, 16, 16]
    np.testing.assert_allclose(multi["losses"], single["losses"], rtol=0, atol=1e-6)
    names = [k for k in single.files if k.startswith("[")]
    assert len(names) >= 10
    for name in names:
        np.testing.assert_allclose(multi[name], single[name], rtol=0, atol=1e-6, err_msg=name)
    # the two updates moved the parameters (lr 1e-2): the comparison is not between inits
    init = jax.device_get(init_params(TINY, jax.random.key(0), std=0.1))
    assert np.max(np.abs(single["['blocks']['q_proj']"] - init["blocks"]["q_proj"])) > 1e-3
