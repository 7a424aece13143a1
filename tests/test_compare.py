"""bench --compare_ref: another revision of the package, imported apart and timed in the same process."""

import os
import subprocess
import sys

import numpy as np
import pytest

from diffusion_lm import compare
from diffusion_lm.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_GIT = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, check=False).returncode == 0
pytestmark = pytest.mark.skipif(not IN_GIT, reason="needs a git checkout of the project")


def test_revision_is_imported_apart_from_this_tree():
  import diffusion_lm.model as ours  # pylint: disable=g-import-not-at-top
  folder = compare.extract_revision("HEAD")
  mods = compare.import_isolated(folder)
  for module in mods.values():
    assert os.path.abspath(module.__file__).startswith(os.path.abspath(folder) + os.sep)
  # The revision's modules use each other, not this tree's.
  assert mods["experiment"].Transformer is mods["model"].Transformer is not ours.Transformer
  assert sys.modules["diffusion_lm.model"] is ours


def test_side_by_side_rows_and_the_same_first_loss(tiny_config):
  lines = []
  rows = compare.compare_rows("HEAD", tiny_config, 20, 19, sample_batch=2, seq_len=32, sampler_steps=2,
                              train_steps=1, repeats=1, log=lines.append)
  timed = {row["what"]: row for row in rows if "ref_s" in row}
  assert set(timed) == {"train step", "forward", "ancestral step"}
  for row in timed.values():
    assert row["ref_s"] > 0 and row["this_s"] > 0 and row["ratio"] == pytest.approx(row["this_s"] / row["ref_s"])
  loss = next(row for row in rows if "ref_loss" in row)
  # HEAD and this tree compute the same network and loss: equal up to float rounding.
  np.testing.assert_allclose(loss["this_loss"], loss["ref_loss"], rtol=1e-5)
  assert any("side by side with HEAD" in line for line in lines)


def test_unknown_revision_is_a_one_line_error():
  with pytest.raises(UserError, match="--compare_ref=no-such-revision: git archive failed"):
    compare.extract_revision("no-such-revision")
