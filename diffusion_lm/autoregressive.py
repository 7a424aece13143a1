"""The autoregressive baseline on the same Transformer: next-token loss and KV-cache decoding.

Sequences are scored in full: the input is the window shifted right behind a start token (the
end-of-document id), so all L tokens are predicted, as the diffusion bound scores all L.
"""

import jax
import jax.numpy as jnp

from diffusion_lm import sampling


def shift_right(tokens_BxL, bos_id: int):
  return jnp.concatenate([jnp.full_like(tokens_BxL[:, :1], bos_id), tokens_BxL[:, :-1]], axis=1)


def next_token_nll(logits_fn, tokens_BxL, bos_id: int):
  """Exact negative log-likelihood of each sequence in nats; float32[B].

  logits_fn: causal (tokens_BxL) -> logits_BxLxK.
  """
  logits = logits_fn(shift_right(tokens_BxL, bos_id)).astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.take_along_axis(log_probs, tokens_BxL[..., None], axis=-1)[..., 0], axis=-1)


def decode(model, params, key, tokens_BxL, example_ids_B, cfg: sampling.SamplerConfig, *, mask_id: int,
           bos_id: int, return_trajectory: bool = False) -> sampling.SampleOutput:
  """Left-to-right sampling with a key/value cache, the whole loop in one lax.fori_loop.

  Positions that are not [MASK] in tokens_BxL are given (a prompt is teacher-forced); the others
  are drawn with the same temperature / top-k / top-p / float64 rules as the diffusion samplers and
  the same per-example key streams. Step i feeds token i-1 and produces position i.
  """
  batch_size, length = tokens_BxL.shape
  tokens_BxL = tokens_BxL.astype(jnp.int32)
  given = tokens_BxL != mask_id
  keys_B = jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids_B)
  _, variables = model.apply({"params": params}, jnp.zeros((batch_size, 1), jnp.int32), decode=True,
                             mutable=["cache"])
  traj0 = jnp.zeros((length if return_trajectory else 0, batch_size, length), jnp.int32)

  def body(i, carry):
    x, cache, traj = carry
    previous = jnp.where(i == 0, bos_id, jax.lax.dynamic_slice_in_dim(x, jnp.maximum(i - 1, 0), 1, axis=1)[:, 0])
    logits, updated = model.apply({"params": params, "cache": cache}, previous[:, None], decode=True,
                                  mutable=["cache"])
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys_B)
    drawn, _ = sampling.draw_tokens(step_keys, logits, cfg)
    column = jnp.where(given[:, i], tokens_BxL[:, i], drawn[:, 0])
    x = jax.lax.dynamic_update_slice_in_dim(x, column[:, None], i, axis=1)
    if return_trajectory:
      traj = traj.at[i].set(x)
    return x, updated["cache"], traj

  x, _, traj = jax.lax.fori_loop(0, length, body, (tokens_BxL, variables["cache"], traj0))
  full = jnp.full((batch_size,), length, jnp.int32)
  return sampling.SampleOutput(x, traj, full, jnp.int32(length), full)
