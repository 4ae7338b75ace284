"""Two processes x 4 CPU devices (jax.distributed, gloo) train like one process x 8 devices."""

import os
import subprocess
import sys

import jax
import numpy as np

from jaxrl.models.transformer import init_params
from tests.sharding_common import TINY
from tests.test_sharding_loop import finish_processes, free_port

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "sharding_multiprocess_script.py")


def _env(devices: int) -> dict:
    fast_compile = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {fast_compile}",
                JAX_PLATFORMS="cpu")


def test_two_processes_reach_the_single_process_parameters(tmp_path):
    single_out, multi_out = tmp_path / "single.npz", tmp_path / "multi.npz"
    port = free_port()
    # All three processes run at once; the single-process reference is independent.
    procs = [subprocess.Popen([sys.executable, SCRIPT, str(single_out)], env=_env(8),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    procs += [subprocess.Popen([sys.executable, SCRIPT, str(multi_out), str(port), str(i)],
                               env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for i in range(2)]
    outputs = finish_processes(procs, timeout=540)
    assert "process 0/2 local_devices=4" in outputs[1] and "process 1/2 local_devices=4" in outputs[2]

    single, multi = np.load(single_out), np.load(multi_out)
    assert set(single.files) == set(multi.files)
    # parameters are really sharded over the 2x2x2 mesh: q_proj [2, 32, 32] -> [2, 16, 16]
    assert list(multi["q_proj_shard"]) == [2, 16, 16]
    # Same per-device programs on the same 2x2x2 mesh; only the cross-device sums (in-process vs
    # gloo) may add up in another order: <= 7 * 2**-24 ~ 4.2e-7 of the summed magnitudes, so the
    # per-step loss and gradient norm agree to rel 1e-5 (abs 1e-6 for a loss near zero).
    np.testing.assert_allclose(multi["losses"], single["losses"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(multi["grad_norms"], single["grad_norms"], rtol=1e-5, atol=0)
    # Parameters after AdamW (lr 1e-2, eps 1e-6): a gradient entry at the float32 noise level
    # can flip the sign of its normalised update g / (sqrt(v) + eps), moving the parameter by
    # up to ~2 lr per update, so the only bound that holds on any CPU is 2 * lr * updates. It
    # catches gross errors (a wrong shard layout, a parameter left unsharded-and-unsynced);
    # the loss and gradient-norm checks above carry the claim that the steps are equal.
    lr, updates = 1e-2, 2
    names = [k for k in single.files if k.startswith("[")]
    assert len(names) >= 10
    for name in names:
        np.testing.assert_allclose(multi[name], single[name], rtol=0, atol=2 * lr * updates, err_msg=name)
    # the two updates moved the parameters (lr 1e-2): the comparison is not between inits
    init = jax.device_get(init_params(TINY, jax.random.key(0), std=0.1))
    assert np.max(np.abs(single["['blocks']['q_proj']"] - init["blocks"]["q_proj"])) > 1e-3
