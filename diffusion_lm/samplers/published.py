"""The published decoders, token for token as their authors' code: LLaDA, Fast-dLLM and Dream.

Each is a preset (`SamplerConfig.name`) over one engine: the generation region starts at the prompt's end
(`gen_start`, the first [MASK] of the row) and is cut into blocks of `block_length` (0 = one block); each
block is denoised by steps that draw a token for every masked position of the block and commit some of
them, ranked by confidence at full precision, ties to the lowest position (torch.topk's order among exact
ties is unspecified; the reference-parity grid has no case that hangs on one).

  llada      LLaDA's `generate` (generate.py): `steps` split evenly over the blocks; in a block of N masked
             positions and S steps, step i commits N // S tokens, one more for the first N % S steps;
             exactly S forward passes per block. confidence max_prob = low_confidence remasking (softmax of
             the untempered logits at the drawn token), random = random remasking; guidance = cfg_scale
             (unconditional pass with the prompt masked); logits_eos_inf / confidence_eos_eot_inf as there.
  fast_dllm  Fast-dLLM's LLaDA decoding (llada/generate.py): a block is denoised until it has no [MASK]
             left (no step budget). threshold: the most confident position and every other one at least
             `threshold` confident; factor > 0: factor-based parallel decoding (the n-th most confident of
             the block is committed while its confidence is >= 1 - factor / (n + 1)); neither: LLaDA's
             counts. approx_cache prefix | dual: the first step of a block is a full forward that keeps
             every layer's keys/values; later steps run on [block .. end] (prefix) or the block (dual).
             Softmax confidences in float64 where x64 is enabled (Fast-dLLM's), else float32.
             On a shifted (Dream-layout) model, Fast-dLLM's Dream block decoding (generation_utils_block.py,
             prefix or dual cache): the block's first forward commits the block's first position only,
             then threshold steps, or `steps / blocks` steps on Dream's time grid ranked by negative entropy.
  dream      Dream's `diffusion_generate` (generation_utils.py): time grid linspace(1, eps, steps + 1) in
             float32; step i commits int(n * (1 - s / t)) of the n still masked (the last step all); alg
             maskgit_plus (confidence max_prob), topk_margin (margin), entropy (entropy), origin (random:
             each masked position is revealed with probability 1 - s / t); alg_temp > 0 samples the
             positions from softmax(confidence / alg_temp); temperature, then Dream's top_p, then top_k.

What differs from the references by design: randomness (temperature > 0, random remasking, origin,
alg_temp) uses JAX keys per example, so it matches in distribution, not draw for draw; rows of a batch
keep their own counts where the references average them over the batch (equal for equal prompts).
"""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_lm.errors import UserError
from diffusion_lm.samplers.common import SampleOutput, commit_top, draw_uniforms, guided, inverse_cdf, rank_desc
from diffusion_lm.samplers.config import SamplerConfig

DECODERS = ("llada", "fast_dllm", "dream")


# ----------------------------------------------------------------------------- counts and time grids


def llada_counts(masked_B, steps: int, i):
  """int32[B]: LLaDA's tokens to commit at step i of `steps` in a block with masked_B masked positions."""
  base, extra = masked_B // steps, masked_B % steps
  return (base + (i < extra)).astype(jnp.int32)


def torch_linspace_f32(start: float, end: float, num: int) -> np.ndarray:
  """float32[num]: torch.linspace(start, end, num) in float32, value for value (CPU kernel: the first half
  counts up from start, the second half down from end, all in float32)."""
  start32, end32 = np.float32(start), np.float32(end)
  if num == 1:
    return np.array([start32], np.float32)
  step = np.float32((end32 - start32) / np.float32(num - 1))
  idx = np.arange(num)
  up = (start32 + step * idx.astype(np.float32)).astype(np.float32)
  down = (end32 - step * (num - 1 - idx).astype(np.float32)).astype(np.float32)
  return np.where(idx < num // 2, up, down).astype(np.float32)


def dream_count(masked_B, grid, i, steps: int):
  """int32[B]: Dream's tokens to commit at step i: int(n * (1 - s / t)) in float32, all at the last step."""
  t, s = grid[i], grid[i + 1]
  share = jnp.float32(1.0) - s / t
  count = jnp.floor(masked_B.astype(jnp.float32) * share).astype(jnp.int32)
  return jnp.where(i >= steps - 1, masked_B, count).astype(jnp.int32)


def factor_counts(conf_BxN, cand_BxN, factor: float):
  """int32[B]: Fast-dLLM's factor rule. With c_0 >= c_1 >= ... the candidates' confidences, the first n >= 1
  with c_n < 1 - factor / (n + 2) stops the count at n; none, or only the last, commits them all."""
  n_B = jnp.sum(cand_BxN, axis=-1)
  ranked = -jnp.sort(-jnp.where(cand_BxN, conf_BxN, -jnp.inf), axis=-1)
  j = jnp.arange(ranked.shape[-1])
  bar = 1.0 - factor / (j + 2.0)
  fails = (j >= 1) & (j < n_B[:, None]) & (ranked < bar[None, :])
  first = jnp.where(jnp.any(fails, axis=-1), jnp.argmax(fails, axis=-1), n_B)
  return jnp.where(first == n_B - 1, n_B, first).astype(jnp.int32)


# ----------------------------------------------------------------------------- tokens and confidences


def dream_filter(logits, top_p: float, top_k: int):
  """Dream's filtering: nucleus first (sorted descending, a token is removed once the cumulative
  probability before it exceeds top_p; the first always stays), then top-k; removed logits get the
  dtype's lowest finite value."""
  low = jnp.finfo(logits.dtype).min
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1, stable=True)
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ranked, axis=-1), axis=-1)
    remove_sorted = jnp.concatenate([jnp.zeros_like(cumulative[..., :1], bool), cumulative[..., :-1] > top_p], -1)
    remove = jnp.zeros_like(remove_sorted).at[
        tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(remove_sorted)
    logits = jnp.where(remove, low, logits)
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, low, logits)
  return logits


def _draw(key_B, logits_BxNxK, temperature: float, step):
  """argmax at temperature 0, else a draw from softmax(logits / temperature) (per-example keys)."""
  if temperature == 0:
    return jnp.argmax(logits_BxNxK, axis=-1).astype(jnp.int32)
  probs = jax.nn.softmax(logits_BxNxK / temperature, axis=-1)
  keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(key_B)
  return inverse_cdf(draw_uniforms(keys, logits_BxNxK.shape[1]), probs)


def llada_tokens(key_B, logits, cfg: SamplerConfig, step, eos_id: int, eot_id: int):
  """(tokens, confidence) of LLaDA / Fast-dLLM: the drawn token and its untempered softmax probability."""
  logits = logits.astype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
  if cfg.logits_eos_inf and eos_id >= 0:
    logits = logits.at[..., eos_id].set(-jnp.inf)
  tokens = _draw(key_B, logits, cfg.temperature, step)
  if cfg.confidence == "random":
    keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, step), 1))(key_B)
    return tokens, jax.vmap(lambda k: jax.random.uniform(k, tokens.shape[1:]))(keys)
  if cfg.confidence_eos_eot_inf:
    for banned in (eos_id, eot_id):
      if banned >= 0:
        logits = logits.at[..., banned].set(-jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  return tokens, jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]


def dream_tokens(key_B, logits, cfg: SamplerConfig, step, kind: str):
  """(tokens, confidence) of Dream's sample_tokens: temperature, top_p, top_k; max_prob | margin | entropy."""
  logits = logits.astype(jnp.float32)
  if cfg.temperature > 0:
    logits = logits / cfg.temperature
  logits = dream_filter(logits, cfg.top_p, cfg.top_k)
  probs = jax.nn.softmax(logits, axis=-1)
  tokens = _draw(key_B, logits, 1.0 if cfg.temperature > 0 else 0.0, step)
  if kind == "margin":
    top2 = jax.lax.top_k(probs, 2)[0]
    return tokens, top2[..., 0] - top2[..., 1]
  if kind == "entropy":
    return tokens, jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)
  return tokens, jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]


# ----------------------------------------------------------------------------- the engine


def check(cfg: SamplerConfig, length: int, gen_start: int, shifted: bool) -> tuple[int, int]:
  """(block length, steps per block) of a published decoder on this layout; one-line errors otherwise."""
  gen = length - gen_start
  if gen < 1:
    raise UserError(f"sampler={cfg.name!r}: nothing to generate after the {gen_start}-token prompt; allowed: "
                    "--max_new_tokens >= 1")
  if cfg.name == "dream" and cfg.approx_cache != "none":
    raise UserError(f"approx_cache={cfg.approx_cache!r} with sampler='dream'; allowed: none (Dream's caches are "
                    "sampler=fast_dllm)")
  if cfg.approx_cache != "none" and cfg.guidance > 0:
    raise UserError(f"approx_cache={cfg.approx_cache!r} with guidance={cfg.guidance}; allowed: one of the two")
  if cfg.name == "fast_dllm" and shifted and cfg.factor > 0:
    raise UserError(f"factor={cfg.factor} with sampler='fast_dllm' on a shifted (Dream-layout) model; allowed: "
                    "--threshold (Fast-dLLM's Dream decoding has no factor rule)")
  if cfg.name == "dream" or (cfg.name == "fast_dllm" and shifted and cfg.approx_cache == "none"):
    # One block: Dream's diffusion_generate, and Fast-dLLM's uncached Dream threshold decoding.
    if cfg.name == "fast_dllm":
      if not cfg.threshold_decoding:
        raise UserError("sampler='fast_dllm' on a shifted (Dream-layout) model without a cache decodes by "
                        "threshold; allowed: --threshold > 0, --approx_cache=prefix|dual, or sampler=dream")
      if gen % cfg.steps:
        raise UserError(f"steps={cfg.steps} does not divide the {gen} tokens to generate (Fast-dLLM's Dream "
                        f"threshold decoding); allowed: a divisor of {gen}")
    return gen, cfg.steps
  block = cfg.block_length if cfg.block_length else gen
  if gen % block:
    raise UserError(f"block_length={cfg.block_length} does not divide the {gen} tokens to generate; allowed: a "
                    f"divisor of {gen} (0 = one block)")
  num_blocks = gen // block
  needs_steps = not (cfg.name == "fast_dllm" and (cfg.threshold_decoding or cfg.factor > 0))
  if needs_steps and cfg.steps % num_blocks:
    raise UserError(f"steps={cfg.steps} is not a multiple of the {num_blocks} blocks; allowed: a multiple of "
                    f"{num_blocks}")
  return block, cfg.steps // num_blocks if needs_steps else block


def sample(model, params, key, tokens_BxL, example_ids_B, cfg: SamplerConfig, *, gen_start: int, mask_id: int,
           eos_id: int = -1, eot_id: int = -1, return_trajectory: bool = False,
           keep_mask_logit: bool = True) -> SampleOutput:
  """Fills the [MASK]s from position gen_start on, block by block, as the chosen published decoder.

  Call under jax.jit (cfg, gen_start and the ids are static). The model's own [MASK] logit is kept, as the
  references keep it (keep_mask_logit=False removes it, as the project's other samplers do); a committed
  [MASK] stays masked, as there.
  """
  tokens_BxL = tokens_BxL.astype(jnp.int32)
  batch, length = tokens_BxL.shape
  shifted = bool(model.config.shift_logits)
  block, steps_pb = check(cfg, length, gen_start, shifted)
  num_blocks = (length - gen_start) // block
  keys_B = jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids_B)
  given_BxL = tokens_BxL != mask_id
  dream_block = cfg.name == "fast_dllm" and shifted and cfg.approx_cache != "none"  # Fast-dLLM's cached Dream
  dream_threshold = cfg.name == "fast_dllm" and shifted and cfg.approx_cache == "none"  # its confidence_threshold
  grid = None
  if cfg.name == "dream" or (dream_block and not cfg.threshold_decoding):
    grid = jnp.asarray(torch_linspace_f32(1.0, cfg.eps, steps_pb + 1))

  def apply(x, **kw):
    return model.apply({"params": params, **kw.pop("variables", {})}, x, None, keep_mask_logit=keep_mask_logit,
                       **kw)

  full = lambda x, t=None: apply(x).astype(jnp.float32)
  if cfg.guidance > 0:  # LLaDA's cfg_scale: un + (cfg + 1) (cond - un), the prompt masked in the unconditional pass
    full = guided(full, given_BxL, mask_id, cfg.guidance)

  def commit_step(x, logits_BxbxK, start, step, masked0_B, i, left_B):
    """One step on the block at `start`: (new x, rows that had masked positions, tokens held back)."""
    xb = jax.lax.dynamic_slice_in_dim(x, start, block, axis=1)
    cand = xb == mask_id
    remaining = jnp.sum(cand, axis=-1)
    if cfg.name == "dream" or dream_block or dream_threshold:
      kind = cfg.confidence if cfg.name == "dream" else (
          "entropy" if dream_block and not cfg.threshold_decoding else "max_prob")
      tokens, conf = dream_tokens(keys_B, logits_BxbxK, cfg, step, kind)
    else:
      tokens, conf = llada_tokens(keys_B, logits_BxbxK, cfg, step, eos_id, eot_id)
    if cfg.name == "dream" and cfg.confidence == "random":  # origin: each reveals with probability 1 - s / t
      t, s = grid[i], grid[i + 1]
      p = jnp.where(i >= steps_pb - 1, 1.0, 1.0 - s / t)
      keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, step), 2))(keys_B)
      commit = cand & (jax.vmap(lambda k: jax.random.uniform(k, (block,)))(keys) < p)
    else:
      if cfg.name == "dream" or (dream_block and not cfg.threshold_decoding):
        count = dream_count(remaining, grid, i, steps_pb)
      elif cfg.name == "fast_dllm" and cfg.factor > 0:
        count = factor_counts(conf, cand, cfg.factor)
      elif dream_threshold:  # a quota of N / S per scheduled step plus what the threshold held back before
        count = jnp.where(i < steps_pb, masked0_B // steps_pb, 0) + left_B
      elif cfg.name == "fast_dllm" and cfg.threshold_decoding:
        count = None
      else:
        count = llada_counts(masked0_B, steps_pb, i)
      if dream_threshold:
        scores = jnp.where(cand, conf, -jnp.inf)
        rank = rank_desc(scores)
        commit = cand & (rank < count[:, None]) & ((rank == 0) | (scores >= cfg.threshold))
      elif count is None:
        scores = jnp.where(cand, conf, -jnp.inf)
        commit = cand & ((rank_desc(scores) == 0) | (scores >= cfg.threshold))
      elif cfg.name == "dream" and cfg.alg_temp > 0:
        keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, step), 3))(keys_B)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (block,)))(keys)
        commit = commit_top(conf / cfg.alg_temp + gumbel, cand, count)
      else:
        commit = commit_top(conf, cand, count)
    held_back = (count - jnp.sum(commit, axis=-1)).astype(jnp.int32) if dream_threshold else left_B
    xb = jnp.where(commit, tokens, xb)
    return jax.lax.dynamic_update_slice_in_dim(x, xb, start, axis=1), remaining > 0, held_back

  frames = (block + steps_pb if dream_threshold else block) if cfg.name == "fast_dllm" else steps_pb
  frames = frames + 1 if dream_block else frames
  traj = jnp.zeros((num_blocks * frames if return_trajectory else 0, batch, length), jnp.int32)

  def record(traj, f, x):
    return traj.at[f].set(x) if return_trajectory else traj

  def cut(a, start, size):
    return jax.lax.dynamic_slice_in_dim(a, start, size, axis=1)

  def one_block(b, state):
    """Decodes block b (a Python int where the chunk's length depends on it, else traced)."""
    x, used, calls, traj, frame = state
    start = gen_start + b * block
    step0 = b * (frames + 1)
    masked0 = jnp.sum(cut(x, start, block) == mask_id, axis=-1)
    zeros = jnp.zeros((batch,), jnp.int32)
    # First step: a full forward (keeping every layer's keys/values for the cached modes).
    if cfg.approx_cache == "none":
      logits, cache = full(x, None), None
    else:
      logits, variables = apply(x, approx_cache="store", mutable=["approx_cache"])
      logits, cache = logits.astype(jnp.float32), variables["approx_cache"]
    if dream_block:  # Fast-dLLM's Dream: the block's first forward commits its first position only
      tokens, _ = dream_tokens(keys_B, cut(logits, start, 1), cfg, step0, "max_prob")
      was_masked = x[:, start] == mask_id
      x = x.at[:, start].set(jnp.where(was_masked, tokens[:, 0], x[:, start]))
      had, left = was_masked, zeros
    else:
      x, had, left = commit_step(x, cut(logits, start, block), start, step0, masked0, 0, zeros)
    used, calls = used + had.astype(jnp.int32), calls + 1
    traj, frame = record(traj, frame, x), frame + 1

    if cfg.approx_cache == "none":
      def block_logits(x_):
        return cut(full(x_, None), start, block)
    else:
      chunk = length - start if cfg.approx_cache == "prefix" else block  # prefix: [block .. end]

      def block_logits(x_):
        out = apply(cut(x_, start, chunk), variables={"approx_cache": cache}, positions_L=start + jnp.arange(chunk),
                    approx_cache="reuse")
        return out[:, :block].astype(jnp.float32)

    def cond(carry):
      x_, i, *_ = carry
      if cfg.name == "llada" or cfg.name == "dream":
        return i < steps_pb
      left_any = jnp.any(cut(x_, start, block) == mask_id)
      if dream_threshold:  # runs past its steps until nothing is masked (each step commits at least one)
        return left_any & (i < block + steps_pb + 1)
      if dream_block and not cfg.threshold_decoding:
        return left_any & (i < steps_pb)
      return left_any & (i < block + 1)

    def body(carry):
      x_, i, used_, calls_, traj_, frame_, left_ = carry
      x_, had_, left_ = commit_step(x_, block_logits(x_), start, step0 + i, masked0, i, left_)
      return x_, i + 1, used_ + had_.astype(jnp.int32), calls_ + 1, record(traj_, frame_, x_), frame_ + 1, left_

    x, _, used, calls, traj, frame, _ = jax.lax.while_loop(cond, body, (x, jnp.int32(1), used, calls, traj, frame,
                                                                         left))
    return x, used, calls, traj, frame

  state = (tokens_BxL, jnp.zeros((batch,), jnp.int32), jnp.int32(0), traj, jnp.int32(0))
  if cfg.approx_cache == "prefix":  # the chunk [block .. end] shrinks block by block: one program per block
    for b in range(num_blocks):
      state = one_block(b, state)
  else:  # one compiled block, looped (compile time independent of the number of blocks)
    state = jax.lax.fori_loop(0, num_blocks, one_block, state)
  x, used, calls, traj, frame = state
  if return_trajectory:
    traj = jnp.where((jnp.arange(traj.shape[0]) < frame)[:, None, None], traj, x[None])
  return SampleOutput(x, traj, used, calls, jnp.full((batch,), length, jnp.int32))


__all__ = ["DECODERS", "check", "dream_count", "dream_filter", "factor_counts", "llada_counts",
           "sample", "torch_linspace_f32"]
