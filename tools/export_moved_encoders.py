"""Writes, for each encoder fixture, an exported folder whose parameters are not the fixture's, plus this
project's logits, for tools/make_encoder_fixtures.py --check_export to load in transformers.

  python tools/export_moved_encoders.py /tmp/xport bert roberta modernbert
  for f in bert roberta modernbert; do /work/venv-hf/bin/python tools/make_encoder_fixtures.py \\
      --check_export=/tmp/xport/${f}_hf --logits=/tmp/xport/${f}_ours.npz; done

Each fixture is imported, every non-zero parameter moved by N(0, 0.05^2) (padding rows stay zero), the
result written as a workdir and exported with `convert --to_hf`; OUT/<family>_ours.npz holds the
reference tokens, this project's logits of the moved model and the [MASK] id.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffusion_lm import convert, experiment  # pylint: disable=g-import-not-at-top,wrong-import-position

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "hf")


def main(out: str, families: list[str]):
  for family in families:
    source = os.path.join(out, f"{family}_src")
    convert.import_hf(os.path.join(FIXTURES, family), source)
    trained = experiment.load_trained(source)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: np.asarray(a) + (0.05 * rng.standard_normal(a.shape)).astype(np.float32)
                          * (np.asarray(a) != 0), trained.params)
    with open(os.path.join(source, "config.json")) as f:
      saved = json.load(f)
    moved_dir = os.path.join(out, f"{family}_moved")
    convert.write_workdir(moved_dir, dict(saved["model"]), "diffusion", trained.tokenizer, params, 16,
                          {"frame_windows": True, "frame_open": "bos"})
    moved = experiment.load_trained(moved_dir)
    tokens = np.load(os.path.join(FIXTURES, family, "reference.npz"))["tokens"]
    logits = np.asarray(moved.model.apply({"params": moved.params}, jnp.asarray(tokens)))
    convert.export_hf(moved_dir, os.path.join(out, f"{family}_hf"))
    np.savez(os.path.join(out, f"{family}_ours.npz"), tokens=tokens, logits=logits, mask_id=moved.tokenizer.mask_id)
    print(f"{family}: exported to {os.path.join(out, family + '_hf')}")


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2:])
