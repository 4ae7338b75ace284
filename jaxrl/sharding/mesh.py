"""Device mesh (data, fsdp, tensor), multi-host start-up, and moving arrays between meshes.

The same code runs on one CPU, one GPU and a TPU pod slice: the mesh always has the three
axes ``data``, ``fsdp`` and ``tensor`` (size-1 axes cost nothing), and every jitted function
gets its shardings from the logical-axis rules in ``jaxrl.sharding.rules``.

Multi-host runs use plain ``jax.distributed``: ``maybe_initialize_distributed`` starts it
with an explicit coordinator from the config, on a TPU pod slice (TPU env vars, or a Cloud
TPU VM whose workers jax reads from the metadata server), or under SLURM with more than one
task (one task per node gets every GPU of its node). It must run before anything touches a
device. ``jaxrl.sharding.watchdog`` ends the other processes when one fails.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Mapping, Sequence

import jax
from jax._src import cloud_tpu_init  # jax's Cloud TPU VM flag; no public API says it before start-up
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrl.sharding.rules import DEFAULT_RULES

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_axis_sizes(num_devices: int, data: int = -1, fsdp: int = 1,
                       tensor: int = 1) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes whose product is ``num_devices``; one size may be -1 (inferred).

    Raises ValueError naming the offending axis when a size is invalid or the sizes do not
    multiply to (or, for an inferred axis, divide) the device count.
    """
    sizes = {"data": int(data), "fsdp": int(fsdp), "tensor": int(tensor)}
    inferred = [name for name, size in sizes.items() if size == -1]
    if len(inferred) > 1:
        raise ValueError(f"only one mesh axis may be -1 (inferred), got -1 for {inferred}")
    for name, size in sizes.items():
        if size != -1 and size < 1:
            raise ValueError(f"mesh axis {name!r} must be >= 1 or -1 (infer), got {size}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if inferred:
        name = inferred[0]
        if num_devices % known:
            fixed = {k: v for k, v in sizes.items() if k != name}
            raise ValueError(
                f"cannot infer mesh axis {name!r}: the other axes {fixed} (product {known}) "
                f"do not divide the {num_devices} devices"
            )
        sizes[name] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"mesh axes {sizes} multiply to {known} but there are {num_devices} devices; "
            f"set one axis (e.g. data) to -1 to infer it"
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh with axes ('data', 'fsdp', 'tensor') over ``devices`` (default: all, every process).

    One size may be -1 and is inferred from the device count. Axes are of type Auto, so
    shardings are applied through ``jit`` in/out shardings and propagated by the compiler.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_axis_sizes(len(devices), data, fsdp, tensor)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Mapping[str, Any] | None = None) -> NamedSharding:
    """Sharding of a [B, ...] batch array: the leading axis follows the ``batch`` rule."""
    rules = DEFAULT_RULES if rules is None else rules
    axes = rules["batch"]
    return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))))


def reshard(tree: Any, target_shardings: Any) -> Any:
    """Move a pytree of arrays to ``target_shardings`` (same structure, or one sharding).

    One ``jax.device_put`` for the whole tree. Arrays already in their target sharding are
    returned as they are (no copy), so a sampling mesh equal to the training mesh costs nothing.
    """
    return jax.device_put(tree, target_shardings)


# --------------------------------------------------------------------------- multi-host
# jax's coordination service declares a process dead after this many seconds without a
# heartbeat (jax's own default is 100). It also bounds how long a failing process waits at
# exit for the others; jaxrl.sharding.watchdog names the dead process sooner.
HEARTBEAT_TIMEOUT_S = 60


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    if hasattr(cfg, "get"):
        try:
            return cfg.get(key, default)
        except TypeError:
            pass
    return getattr(cfg, key, default)


def _on_cloud_tpu_vm() -> bool:
    # jax sets this flag at `import jax` when it finds TPU chips and libtpu (no backend start).
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def detect_cluster(env: Mapping[str, str] | None = None, on_tpu_vm: bool | None = None) -> str | None:
    """Which multi-process launcher started us: "tpu_pod", "tpu_vm", "slurm", or None.

    "tpu_pod": ``TPU_WORKER_HOSTNAMES`` (or ``TPU_PROCESS_ADDRESSES``) lists more than one
    worker, or ``MEGASCALE_COORDINATOR_ADDRESS`` is set (GKE, multi-slice). "tpu_vm": a Cloud
    TPU VM (``on_tpu_vm``, default: jax found TPU chips at import) without those variables;
    jax's own detection reads the worker list from the metadata server (a single-host VM
    becomes a one-process run). ``TPU_SKIP_MDS_QUERY`` turns that off. "slurm":
    ``SLURM_JOB_ID`` with ``SLURM_NTASKS`` (or ``SLURM_NPROCS``) > 1. None: single process.
    """
    env = os.environ if env is None else env
    on_tpu_vm = _on_cloud_tpu_vm() if on_tpu_vm is None else on_tpu_vm
    workers = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES", "")
    hosts = [h for h in workers.split(",") if h.strip()]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu_pod"
    if on_tpu_vm and not hosts and env.get("TPU_SKIP_MDS_QUERY") is None:
        return "tpu_vm"
    tasks = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or "1"
    if env.get("SLURM_JOB_ID") and tasks.isdigit() and int(tasks) > 1:
        return "slurm"
    return None


def slurm_first_host(node_list: str) -> str:
    """First host of a SLURM node list, the coordinator: "gpu[03-04,07],cpu1" -> "gpu03"."""
    cut = next((i for i, ch in enumerate(node_list) if ch in ",["), len(node_list))
    if cut == len(node_list) or node_list[cut] == ",":
        return node_list[:cut].strip()
    inner = node_list[cut + 1:]
    end = next((i for i, ch in enumerate(inner) if ch in ",-]"), len(inner))
    return node_list[:cut].strip() + inner[:end]


def slurm_initialize_kwargs(env: Mapping[str, str]) -> dict[str, Any]:
    """``jax.distributed.initialize`` arguments under SLURM that give this process its GPUs.

    One task per node (``SLURM_NTASKS`` equals the step's node count, the layout of
    ``launch/slurm_gpu.sbatch``): coordinator (first node, port ``JAX_COORDINATOR_PORT`` or
    jax's job-id port), process count and id are read here and jax's detection is switched
    off, because it would set ``local_device_ids = [SLURM_LOCALID]`` and leave 7 of 8 GPUs
    idle; every device the task sees is used. Several tasks per node: jax's default (one GPU
    per task, ``[SLURM_LOCALID]``), except that a task bound to one GPU by SLURM
    (``CUDA_VISIBLE_DEVICES`` lists one) uses that GPU, device 0. Raises ValueError naming
    the missing variable.
    """
    def need(*names: str) -> str:
        for name in names:
            if env.get(name):
                return env[name]
        raise ValueError(f"SLURM start-up: {' / '.join(names)} is not set (run the job step under srun)")

    tasks = int(need("SLURM_NTASKS", "SLURM_NPROCS"))
    nodes = int(need("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"))
    if tasks == nodes:
        port = env.get("JAX_COORDINATOR_PORT") or str(int(need("SLURM_JOB_ID")) % 2**12 + (65535 - 2**12 + 1))
        host = slurm_first_host(need("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
        return {"coordinator_address": f"{host}:{port}", "num_processes": tasks,
                "process_id": int(need("SLURM_PROCID")), "local_device_ids": None,
                "cluster_detection_method": "deactivate"}
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return {"local_device_ids": [0]} if len(visible) == 1 else {}


def distributed_initialize_kwargs(cfg: Any | None = None, env: Mapping[str, str] | None = None,
                                  on_tpu_vm: bool | None = None) -> dict[str, Any] | None:
    """Arguments for ``jax.distributed.initialize``, or None for a single-process run.

    cfg: optional section with ``coordinator_address`` ("host:port"), ``num_processes``,
    ``process_id``, ``local_device_ids`` and ``heartbeat_timeout_s``. An explicit
    coordinator wins (jax's cluster detection off; every local device used unless
    ``local_device_ids`` says otherwise). Otherwise ``detect_cluster``: SLURM as in
    ``slurm_initialize_kwargs``; TPU (pod env vars or a Cloud TPU VM): no cluster arguments,
    jax's own detection (environment, else the metadata server) fills them.
    """
    env = os.environ if env is None else env
    timeouts = {"heartbeat_timeout_seconds": int(_get(cfg, "heartbeat_timeout_s", None) or HEARTBEAT_TIMEOUT_S)}
    coordinator = _get(cfg, "coordinator_address")
    num_processes = _get(cfg, "num_processes")
    process_id = _get(cfg, "process_id")
    local_device_ids = _get(cfg, "local_device_ids")
    if coordinator:
        if num_processes is None or process_id is None:
            raise ValueError(
                "distributed.coordinator_address is set, so distributed.num_processes and "
                "distributed.process_id must be set too"
            )
        return {"coordinator_address": coordinator, "num_processes": int(num_processes),
                "process_id": int(process_id), "local_device_ids": local_device_ids,
                "cluster_detection_method": "deactivate", **timeouts}
    cluster = detect_cluster(env, on_tpu_vm)
    if cluster is None:
        return None
    kwargs = slurm_initialize_kwargs(env) if cluster == "slurm" else {}
    if local_device_ids is not None:
        kwargs["local_device_ids"] = local_device_ids
    return {**kwargs, **timeouts}


def maybe_initialize_distributed(cfg: Any | None = None,
                                 env: Mapping[str, str] | None = None) -> bool:
    """Start ``jax.distributed`` when this is one process of several; returns whether it did.

    The arguments come from ``distributed_initialize_kwargs(cfg, env)``; single-process runs
    do nothing. After a start, one line on stderr names the process, its local device count
    and the global one. Calling it again after a successful start does nothing and returns
    True. It must run before anything touches a device.
    """
    if _distributed_is_initialized():
        return True
    kwargs = distributed_initialize_kwargs(cfg, env)
    if kwargs is None:
        return False
    jax.distributed.initialize(**kwargs)
    print(f"jaxrl: jax.distributed started: process {jax.process_index()} of {jax.process_count()}, "
          f"{jax.local_device_count()} local devices, {jax.device_count()} in all", file=sys.stderr, flush=True)
    return True


def _distributed_is_initialized() -> bool:
    is_initialized = getattr(jax.distributed, "is_initialized", None)
    return bool(is_initialized()) if is_initialized is not None else False
