"""Peak host memory (RSS) of a streaming import and of a multi-process parameter load.

  python tools/make_synthetic_llama.py --out=/tmp/llama1b
  python tools/measure_memory.py --from_hf=/tmp/llama1b --workdir=/tmp/llama1b_w [--dtype=bfloat16]

1. import: `python -m diffusion_lm.convert --from_hf=... --workdir=...` under `/usr/bin/time -v`; its
   "Maximum resident set size" against the bound (largest tensor x 2 + 1 GiB, the tensor as float32, the
   dtype the importer reads it in).
2. load: --processes local processes (default 2) x --devices CPU devices each (default 4), joined by
   jax.distributed on 127.0.0.1, each running loading.load_trained onto an fsdp mesh over all devices
   (parameters split 8 ways) under `/usr/bin/time -v`; each process's peak RSS against the bytes of the
   whole parameter set and of the shards its own devices hold.

Prints one JSON line per measurement. `--load_only` skips the import (the workdir exists).
A process of the load (internal): --process_id=I with --coordinator=HOST:PORT; --dump=PATH writes the
gathered parameters (.npz, tests compare them with a one-process load).
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script from anywhere
GIB = 1 << 30


def peak_rss_bytes(time_output: str) -> int:
  match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_output)
  if match is None:
    raise RuntimeError(f"no peak RSS in /usr/bin/time -v output: {time_output[-500:]}")
  return int(match.group(1)) * 1024


def largest_tensor_values(folder: str) -> int:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  from diffusion_lm.convert import io  # pylint: disable=g-import-not-at-top
  largest = 0
  for path in io.safetensors_files(folder):
    with safe_open(path, framework="np") as f:
      for key in f.keys():
        shape = f.get_slice(key).get_shape()
        largest = max(largest, math.prod(shape))
  return largest


def measure_import(args) -> dict:
  command = ["/usr/bin/time", "-v", sys.executable, "-m", "diffusion_lm.convert", f"--from_hf={args.from_hf}",
             f"--workdir={args.workdir}", f"--dtype={args.dtype}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f"import failed:\n{out.stderr[-3000:]}")
  peak = peak_rss_bytes(out.stderr)
  largest = 4 * largest_tensor_values(args.from_hf)
  bound = 2 * largest + GIB
  return {"measure": "import", "dtype": args.dtype, "peak_rss_gib": round(peak / GIB, 3),
          "largest_tensor_float32_gib": round(largest / GIB, 3), "bound_gib": round(bound / GIB, 3),
          "within_bound": peak <= bound, "summary": out.stdout.strip().splitlines()[-1]}


def measure_load(args) -> list[dict]:
  port = args.port or 20000 + os.getpid() % 20000
  procs = []
  for i in range(args.processes):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}"}
    command = ["/usr/bin/time", "-v", sys.executable, os.path.abspath(__file__), f"--workdir={args.workdir}",
               f"--process_id={i}", f"--processes={args.processes}", f"--coordinator=127.0.0.1:{port}"]
    if args.param_dtype:
      command.append(f"--param_dtype={args.param_dtype}")
    if args.dump:
      command.append(f"--dump={args.dump}")
    procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
  results = []
  for i, proc in enumerate(procs):
    stdout, stderr = proc.communicate(timeout=1800)
    if proc.returncode:
      raise SystemExit(f"load process {i} failed:\n{stderr[-3000:]}")
    record = json.loads(stdout.strip().splitlines()[-1])
    peak = peak_rss_bytes(stderr)
    record.update(measure="load", peak_rss_gib=round(peak / GIB, 3),
                  peak_over_whole_set=round(peak / record["whole_set_bytes"], 3))
    results.append(record)
  return results


def load_process(args) -> None:
  """One process of the load: joins the others, restores the parameters onto an fsdp mesh over every
  device, prints what it holds (and dumps the gathered tree with --dump)."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from diffusion_lm import distributed, loading  # pylint: disable=g-import-not-at-top
  distributed.initialize(False, args.coordinator, args.processes, args.process_id, 100)
  mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
  trained = loading.load_trained(args.workdir, mesh_config=mesh, dtype=args.param_dtype)
  leaves = jax.tree.leaves(trained.params)
  local = sum(shard.data.nbytes for leaf in leaves for shard in leaf.addressable_shards)
  whole = sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)
  if args.dump:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    gathered = multihost_utils.process_allgather(trained.params, tiled=True)
    if jax.process_index() == 0:
      flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(gathered)}
      np.savez(args.dump, **flat)
  print(json.dumps({"process": jax.process_index(), "devices": jax.local_device_count(),
                    "mesh": dict(trained.mesh.shape), "dtype": str(leaves[0].dtype),
                    "whole_set_bytes": whole, "whole_set_gib": round(whole / GIB, 3),
                    "own_shards_bytes": local, "own_shards_gib": round(local / GIB, 3)}), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--from_hf", help="the Hugging Face folder to import")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="import: stored dtype")
  parser.add_argument("--param_dtype", default=None, choices=["float32", "bfloat16"], help="load: restored dtype")
  parser.add_argument("--load_only", action="store_true")
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices", type=int, default=4, help="CPU devices per process")
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--dump", default="")
  parser.add_argument("--process_id", type=int, default=-1, help=argparse.SUPPRESS)
  parser.add_argument("--coordinator", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.process_id >= 0:
    load_process(args)
    return
  if not args.load_only:
    if not args.from_hf:
      raise SystemExit("error: --from_hf is required (or --load_only with an imported --workdir)")
    print(json.dumps(measure_import(args)), flush=True)
  for record in measure_load(args):
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main()
