"""Device mesh and logical-axis sharding rules: one code path from 1 CPU to a TPU pod.

The mesh has axes (data, fsdp, tensor). The batch is split over data x fsdp; parameters are split
over fsdp along "embed" and over tensor along "mlp"/"heads"/"vocab", by flax's logical-axis rules.
"""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from diffusion_lm.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("position", None),  # rows of a learned position table (GPT-2)
    ("vocab", "tensor"),
)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """(data, fsdp, tensor) from config, with one -1 filled from the device count."""
  shape = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise UserError(f"mesh (data, fsdp, tensor)={tuple(shape)}; allowed: positive sizes with at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise UserError(f"mesh (data, fsdp, tensor)={tuple(shape)} does not divide {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise UserError(f"mesh (data, fsdp, tensor)={tuple(shape)} uses {math.prod(shape)} devices, but "
                    f"{num_devices} are present; allowed: sizes whose product is {num_devices}")
  return tuple(shape)


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
  except NotImplementedError as e:  # a TPU torus that cannot host this logical shape
    raise UserError(f"mesh (data, fsdp, tensor)={shape} cannot be laid out on this device topology "
                    f"({str(e).split('.')[0]}); allowed: axis sizes that are products of the physical "
                    "axis sizes, e.g. 4 x 16 on 4x4x4") from None


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(("data", "fsdp")))


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def logical_shardings(abstract_tree, mesh: Mesh):
  """NamedShardings for a pytree holding flax LogicallyPartitioned boxes (unboxed structure)."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def global_batch_from_local(local_rows: np.ndarray, mesh: Mesh):
  """Assembles the global batch array from this process's rows (its slice of the global batch)."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh), local_rows)


def padded_batch_size(num: int, mesh: Mesh) -> int:
  """num rounded up to a multiple of the data-parallel size."""
  dp = data_parallel_size(mesh)
  return -(-num // dp) * dp


def pad_rows(x: np.ndarray, mesh: Mesh) -> np.ndarray:
  """Repeats the first row until the batch divides over the data-parallel axes."""
  extra = padded_batch_size(x.shape[0], mesh) - x.shape[0]
  return np.concatenate([x, np.repeat(x[:1], extra, axis=0)]) if extra else x


def put_global(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """A batch-sharded global array from a host array that every process holds in full."""
  return jax.make_array_from_callback(x.shape, batch_sharding(mesh), lambda index: x[index])
