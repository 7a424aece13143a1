"""Generation with a trained model: batch-size and device-count invariance, every strategy end to end."""

import jax
import numpy as np
import pytest

from diffusion_lm import experiment, sampling, sharding
from diffusion_lm.generation import Generator


@pytest.fixture(scope="module")
def trained(trained_workdir):
  return experiment.load_trained(trained_workdir)


def _generator(trained, cfg, devices, trajectory=False):
  mesh = sharding.make_mesh(trained.config.mesh, devices)
  params = jax.device_put(trained.params, jax.tree.map(
      lambda s: jax.sharding.NamedSharding(mesh, s.spec), trained.param_shardings))
  shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s.spec), trained.param_shardings)
  return Generator(trained.model, trained.schedule, trained.tokenizer, mesh, shardings, cfg,
                   return_trajectory=trajectory), params


@pytest.mark.parametrize("cfg", [sampling.SamplerConfig("ancestral", steps=8),
                                 sampling.SamplerConfig("confidence", steps=8, confidence="margin"),
                                 sampling.SamplerConfig("threshold", steps=8, threshold=0.3),
                                 sampling.SamplerConfig("llada", steps=9, block_length=0, temperature=0.0)],
                         ids=lambda c: c.name)
def test_same_sequence_whatever_the_batch_and_devices(trained, cfg):
  results = {}
  for devices in (jax.devices()[:1], jax.devices()):
    gen, params = _generator(trained, cfg, devices)
    template = gen.template(32, 32, prompt="KING.")
    for batch in (1, 8, 32):
      results[(len(devices), batch)] = gen(params, template[:batch], seed=3).tokens
  reference = results[(8, 32)]
  for (num_devices, batch), tokens in results.items():
    np.testing.assert_array_equal(tokens, reference[:batch], err_msg=f"{num_devices} devices, batch {batch}")


@pytest.mark.parametrize("cfg", [
    sampling.SamplerConfig("ancestral", steps=16, time_grid="cosine", top_p=0.9),
    sampling.SamplerConfig("confidence", steps=8, commit_schedule="cosine", top_k=5),
    sampling.SamplerConfig("blocks", steps=16, block_length=8),
    sampling.SamplerConfig("threshold", steps=32, threshold=0.5),
    sampling.SamplerConfig("remdm", steps=16, remask_eta=0.2),
    sampling.SamplerConfig("ancestral", steps=8, float64=True, guidance=1.0),
], ids=lambda c: f"{c.name}-{c.float64}")
def test_every_strategy_with_infill(trained, cfg):
  gen, params = _generator(trained, cfg, jax.devices(), trajectory=True)
  template = gen.template(32, 4, infill="To be, [MASK*6] the question.[MASK*3]")  # + 2 free at the end
  out = gen(params, template, seed=0)
  mask = trained.tokenizer.mask_id
  assert not (out.tokens == mask).any()
  given = template != mask
  assert (out.tokens[given] == template[given]).all()
  assert all(text.startswith("To be, ") and "the question." in text for text in gen.decode(out.tokens))
  assert out.trajectory.shape[1:] == template.shape
  gen(params, template, seed=1)
  assert gen.num_compiles == 1  # the second call reused the compiled sampler
