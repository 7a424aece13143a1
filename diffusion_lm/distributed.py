"""Multi-host start-up: one process per host (or per simulated host), all running the same command."""

import jax

from diffusion_lm.errors import UserError


def initialize(auto: bool = False, coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1, heartbeat_timeout: int = 100) -> None:
  """Joins the JAX distributed runtime.

  auto: on TPU pods (and other managed clusters) JAX finds the coordinator itself.
  coordinator_address / num_processes / process_id: explicit, e.g. several local CPU processes on
  127.0.0.1 simulating a pod (launch/local_multihost.sh).
  """
  if auto:
    jax.distributed.initialize()
    return
  if not coordinator_address:
    return
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise UserError(f"--num_processes={num_processes} --process_id={process_id}; allowed: num_processes >= 1 "
                    "and 0 <= process_id < num_processes")
  if jax.config.jax_platforms in (None, "", "cpu"):
    # Cross-process collectives between CPU processes go through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # If a process dies, the others fail within about heartbeat_timeout seconds instead of hanging.
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=120,
                             heartbeat_timeout_seconds=heartbeat_timeout)
