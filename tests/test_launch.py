"""Multi-host start-up under simulated SLURM and TPU environments: every local device goes to JAX.

``maybe_initialize_distributed`` runs with ``jax.distributed.initialize`` captured; the captured
arguments then go through jax's own ``State.initialize`` (its cluster detection and its choice
of visible GPUs) with only the RPC layer faked, so the devices checked are the ones jax picks.
"""

import os
import subprocess
import types

import jax
import pytest
from jax._src import distributed as jax_distributed
from jax._src.clusters import cloud_tpu_cluster, cluster as cluster_module
from jax._src.clusters.slurm_cluster import SlurmCluster

from jaxrl.sharding import mesh as mesh_module
from jaxrl.sharding.mesh import detect_cluster, maybe_initialize_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_VARS = ("SLURM_", "TPU_", "MEGASCALE_", "JAX_", "OMPI_", "PMI_", "CUDA_VISIBLE_DEVICES",
                "KUBERNETES_")


def _clean_env(monkeypatch, env):
    for name in list(os.environ):
        if name.startswith(CLUSTER_VARS):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def _jax_start(monkeypatch, env, *, tpu_metadata=None):
    """Run maybe_initialize_distributed in ``env``; return what jax itself then set up.

    Returns {"kwargs": captured initialize arguments, "client": (address, process id),
    "num_processes", "visible": the jax_cuda_visible_devices jax sets (None = every device)}.
    """
    _clean_env(monkeypatch, env)
    captured = {}
    monkeypatch.setattr(mesh_module, "_distributed_is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: captured.update(kw))
    monkeypatch.setattr(mesh_module, "_on_cloud_tpu_vm", lambda: tpu_metadata is not None, raising=False)
    assert maybe_initialize_distributed(None) is True

    updates, client = {}, {}
    fake_jax = types.SimpleNamespace(
        get_distributed_runtime_service=lambda *a, **k: object(),
        get_distributed_runtime_client=lambda address, pid, **k: (
            client.update(address=address, pid=pid) or types.SimpleNamespace(connect=lambda: None)))
    monkeypatch.setattr(jax_distributed, "_jax", fake_jax)
    monkeypatch.setattr(jax_distributed, "config", types.SimpleNamespace(update=updates.__setitem__))
    monkeypatch.setattr(jax_distributed.State, "initialize_preemption_sync_manager", lambda self: None)
    if tpu_metadata is not None:  # a plain Cloud TPU VM: jax reads the metadata server
        monkeypatch.setattr(cluster_module, "running_in_cloud_tpu_vm", True)
        monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
        monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", lambda key: (tpu_metadata[key], 200))
        monkeypatch.setattr(cloud_tpu_cluster.BaseTpuCluster, "wait_for_coordinator",
                            classmethod(lambda cls, address, timeout: None))
    state = jax_distributed.State()
    state.initialize(**{k: v for k, v in captured.items() if k != "slice_index"})
    return {"kwargs": captured, "client": (client["address"], client["pid"]),
            "num_processes": state.num_processes, "visible": updates.get("jax_cuda_visible_devices")}


SLURM_NODE = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[07-10]", "SLURM_JOB_NODELIST": "gpu[07-10]",
              "SLURM_NTASKS": "4", "SLURM_STEP_NUM_NODES": "4", "SLURM_NNODES": "4",
              "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "2",
              "SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}


def test_slurm_one_task_per_node_gives_jax_every_gpu(monkeypatch):
    got = _jax_start(monkeypatch, SLURM_NODE)
    assert got["visible"] is None  # no restriction: all 8 GPUs of the node (jax's default: "0")
    assert got["num_processes"] == 4
    # jax's own SLURM class picks the same coordinator and process id as the one jaxrl passes
    assert got["client"] == (SlurmCluster.get_coordinator_address(None, None), SlurmCluster.get_process_id())
    assert got["client"] == ("gpu07:" + str(4242 % 4096 + 61440), 2)


def test_slurm_one_task_per_gpu_gives_each_task_its_own_gpu(monkeypatch):
    env = dict(SLURM_NODE, SLURM_NTASKS="32", SLURM_PROCID="13", SLURM_LOCALID="5")
    got = _jax_start(monkeypatch, env)
    assert got["visible"] == "5" and got["num_processes"] == 32 and got["client"][1] == 13
    # a task that SLURM bound to one GPU sees it as device 0
    got = _jax_start(monkeypatch, dict(env, CUDA_VISIBLE_DEVICES="5"))
    assert got["visible"] == "0"


def test_plain_tpu_vm_pod_uses_jax_detection_from_the_metadata_server(monkeypatch):
    metadata = {"agent-worker-number": "3", "worker-network-endpoints": "t0,t1,t2,t3", "tpu-env": ""}
    got = _jax_start(monkeypatch, {}, tpu_metadata=metadata)
    cluster_args = ("coordinator_address", "num_processes", "process_id", "local_device_ids")
    assert not set(got["kwargs"]) & set(cluster_args)  # initialize() with no cluster arguments
    assert got["client"] == ("t0:8482", 3) and got["num_processes"] == 4
    assert got["visible"] is None  # jax never restricts TPU chips


def test_gke_tpu_env_vars_and_explicit_coordinator(monkeypatch):
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "t0,t1"}, on_tpu_vm=False) == "tpu_pod"
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}, on_tpu_vm=True) is None
    assert detect_cluster({}, on_tpu_vm=True) == "tpu_vm"
    assert detect_cluster({"TPU_SKIP_MDS_QUERY": "1"}, on_tpu_vm=True) is None
    assert detect_cluster({}, on_tpu_vm=False) is None
    # explicit coordinator inside a SLURM allocation: jax's detection stays off, every GPU used
    _clean_env(monkeypatch, SLURM_NODE)
    kwargs = mesh_module.distributed_initialize_kwargs(
        {"coordinator_address": "h:1234", "num_processes": 2, "process_id": 1})
    assert kwargs["cluster_detection_method"] == "deactivate" and kwargs["local_device_ids"] is None
    assert kwargs["heartbeat_timeout_seconds"] == mesh_module.HEARTBEAT_TIMEOUT_S


@pytest.mark.parametrize("node_list,first", [
    ("node001", "node001"), ("node001,host2", "node001"), ("node[001-015],host2", "node001"),
    ("node[001,007-015],host2", "node001"), ("gpu-a[3],x", "gpu-a3"), ("n[7]", "n7")])
def test_slurm_first_host_matches_hand_worked_lists(node_list, first):
    assert mesh_module.slurm_first_host(node_list) == first


def test_slurm_missing_variable_is_named():
    with pytest.raises(ValueError, match="SLURM_STEP_NUM_NODES"):
        mesh_module.slurm_initialize_kwargs({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"})


def test_launch_scripts_parse_and_slurm_starts_the_tested_layout():
    for script in ("launch/slurm_gpu.sbatch", "launch/tpu_pod.sh", "launch/local_gpu.sh"):
        subprocess.run(["bash", "-n", os.path.join(ROOT, script)], check=True)
    with open(os.path.join(ROOT, "launch/slurm_gpu.sbatch")) as handle:
        text = handle.read()
    # one task per node (SLURM_NTASKS == node count), the layout simulated above
    assert "#SBATCH --ntasks-per-node=1" in text and "srun --kill-on-bad-exit=1 --ntasks-per-node=1" in text
