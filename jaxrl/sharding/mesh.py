"""Device mesh (data, fsdp, tensor), multi-host start-up, and moving arrays between meshes.

The same code runs on one CPU, one GPU and a TPU pod slice: the mesh always has the three
axes ``data``, ``fsdp`` and ``tensor`` (size-1 axes cost nothing), and every jitted function
gets its shardings from the logical-axis rules in ``jaxrl.sharding.rules``.

Multi-host runs use plain ``jax.distributed``: ``maybe_initialize_distributed`` calls
``jax.distributed.initialize()`` on a TPU pod slice (several workers in the TPU env vars),
under SLURM with more than one task, or with an explicit coordinator from the config. It
must run before anything touches a device.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import jax
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


def detect_cluster(env: Mapping[str, str] | None = None) -> str | None:
    """Which multi-process launcher started us: "tpu_pod", "slurm", or None (single process).

    TPU pod slice: ``TPU_WORKER_HOSTNAMES`` lists more than one worker, or
    ``MEGASCALE_COORDINATOR_ADDRESS`` is set (multi-slice). SLURM: ``SLURM_JOB_ID`` with
    ``SLURM_NTASKS`` (or ``SLURM_NPROCS``) > 1. jax's own cluster detection then reads the
    coordinator, process count and process id from the same variables.
    """
    env = os.environ if env is None else env
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu_pod"
    tasks = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or "1"
    if env.get("SLURM_JOB_ID") and tasks.isdigit() and int(tasks) > 1:
        return "slurm"
    return None


def maybe_initialize_distributed(cfg: Any | None = None,
                                 env: Mapping[str, str] | None = None) -> bool:
    """Start ``jax.distributed`` when this is one process of several; returns whether it did.

    cfg: optional config section with keys ``coordinator_address`` ("host:port"),
    ``num_processes``, ``process_id`` and ``local_device_ids``. An explicit coordinator wins;
    otherwise a TPU pod slice or a multi-task SLURM job is detected from the environment
    (``detect_cluster``) and jax reads the details from it. Single-process runs do nothing.
    Calling it again after a successful start does nothing and returns True.
    """
    if _distributed_is_initialized():
        return True
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
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=int(num_processes),
            process_id=int(process_id), local_device_ids=local_device_ids,
        )
        return True
    if detect_cluster(env) is None:
        return False
    jax.distributed.initialize(local_device_ids=local_device_ids)
    return True


def _distributed_is_initialized() -> bool:
    is_initialized = getattr(jax.distributed, "is_initialized", None)
    return bool(is_initialized()) if is_initialized is not None else False
