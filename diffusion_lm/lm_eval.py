"""Benchmarks as LLaDA, Dream and dLLM report them: an lm-evaluation-harness model, and a local task runner.

  python -m diffusion_lm.lm_eval --workdir=W --tasks=tests/fixtures/lm_eval/tiny_tasks.jsonl --mc_num=32
  lm_eval --model diffusion_lm --model_args workdir=W,mc_num=128,batch_size=32 --tasks hellaswag   # internet

`loglikelihood(context, continuation)`: a masked-diffusion model's is LLaDA's Monte-Carlo estimate of the
conditional likelihood (its get_log_likelihood / eval_llada.py): per batch a mask count k ~ U{1..T} and the
batch's counts spread evenly from it over 1..T, each row's masked positions a random subset of the T
continuation tokens (the context never masked), loss = sum over masked of -log p / (count / T), averaged;
`mc_num` samples in batches of `batch_size`. An autoregressive model's is exact. A block-diffusion model's is
a Monte-Carlo estimate of its own bound, the block NELBO of the continuation given the context (the context
and the [MASK]s that fill the last block held clean and unscored, each continuation block masked at its own
time, times stratified over a batch's block slots, as training draws them): exact in expectation for
blocks of one token, a lower bound on the likelihood otherwise. `generate_until` decodes
with the workdir's sampler (an imported LLaDA's or Dream's own decoder) and cuts at the first stop string.

Local tasks (the hub is not needed): a JSON-lines file, one request per line, either
  {"task": NAME, "type": "multiple_choice", "context": str, "choices": [str, ...], "gold": int}
  {"task": NAME, "type": "generate_until", "context": str, "until": [str, ...], "target": str}
scored as accuracy (the choice of highest log-likelihood) and exact match (stripped), one JSON line per task.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from diffusion_lm import paths
from diffusion_lm.objectives import block
from diffusion_lm.objectives.base import bind
from diffusion_lm.errors import UserError, cli_main, parse_flags


def _split_pair(context: str, continuation: str):
  """lm-evaluation-harness' convention: trailing whitespace of the context belongs to the continuation."""
  spaces = len(context) - len(context.rstrip())
  if spaces:
    return context[:-spaces], context[-spaces:] + continuation
  return context, continuation


def llada_mask_counts(key, batch: int, target_len: int):
  """int32[batch]: LLaDA's masked counts, k ~ U{1..T} then round(linspace(k, k + (b-1) T/b, b)) wrapped into
  1..T, so a batch covers the mask rates evenly."""
  k = jax.random.randint(key, (), 1, target_len + 1).astype(jnp.float32)
  x = jnp.round(jnp.linspace(k, k + (batch - 1) * (target_len / batch), batch)).astype(jnp.int32)
  return (x - 1) % target_len + 1


class Evaluator:
  """Log-likelihoods and generations of one loaded workdir (experiment.Trained)."""

  def __init__(self, trained, mc_num: int = 128, batch_size: int = 32, seed: int = 0, max_gen_toks: int = 128,
               **sampler_settings):
    if not (isinstance(mc_num, int) and isinstance(batch_size, int) and batch_size >= 1 and mc_num >= batch_size
            and mc_num % batch_size == 0):
      raise UserError(f"mc_num={mc_num}, batch_size={batch_size}; allowed: integers with batch_size >= 1 "
                      "dividing mc_num")
    cfg = trained.model.config
    self.trained, self.mc_num, self.batch_size, self.seed = trained, mc_num, batch_size, seed
    self.max_gen_toks, self.settings = max_gen_toks, sampler_settings
    self.causal = cfg.causal
    model, mask_id = trained.model, trained.tokenizer.mask_id
    forward = lambda params, x: model.apply({"params": params}, x, None, keep_mask_logit=True)  # noqa: E731

    def mc_loss(params, seq_L, prompt_len, key):
      length = seq_L.shape[0]
      target = length - prompt_len
      count_key, perm_key = jax.random.split(key)
      counts_B = llada_mask_counts(count_key, batch_size, target)
      ranks = jax.vmap(lambda k: jax.random.permutation(k, target))(jax.random.split(perm_key, batch_size))
      masked_T = ranks < counts_B[:, None]
      masked = jnp.concatenate([jnp.zeros((batch_size, prompt_len), bool), masked_T], axis=1)
      seq = jnp.broadcast_to(seq_L, (batch_size, length))
      logits = forward(params, jnp.where(masked, mask_id, seq)).astype(jnp.float32)
      nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), seq[..., None], -1)[..., 0]
      weight = target / counts_B.astype(jnp.float32)
      return jnp.sum(jnp.where(masked, nll, 0.0) * weight[:, None]) / batch_size

    def ar_loglik(params, seq_L, prompt_len):
      logits = forward(params, seq_L[None]).astype(jnp.float32)[0]
      logp = jax.nn.log_softmax(logits[:-1], -1)
      token_logp = jnp.take_along_axis(logp, seq_L[1:, None], -1)[:, 0]
      scored = jnp.arange(1, seq_L.shape[0]) >= prompt_len
      greedy = jnp.all(jnp.where(scored, jnp.argmax(logp, -1) == seq_L[1:], True))
      return jnp.sum(jnp.where(scored, token_logp, 0.0)), greedy

    def block_loss(params, seq_L, prompt_len, target_len, key):
      # The block-diffusion bound of the continuation given the context: the context (and the padding that
      # fills the last block: [MASK]s, the not-yet-decoded rest of a block as decoding sees it) held clean
      # and unscored, each continuation block masked at its own time, stratified over the batch's slots.
      seq = jnp.broadcast_to(seq_L, (batch_size, seq_L.shape[0]))
      position = jnp.arange(seq_L.shape[0])
      keep = jnp.broadcast_to((position < prompt_len) | (position >= prompt_len + target_len), seq.shape)
      rows = block.block_noise(seq, key, trained.schedule, mask_id, cfg.block_size, keep_BxL=keep)
      return jnp.mean(block.noised_block_loss(bind(model, params), rows, cfg.block_size)["nelbo"])

    self._mc_loss = jax.jit(mc_loss, static_argnums=2)
    self._block_loss = jax.jit(block_loss, static_argnums=(2, 3))
    self._ar_loglik = jax.jit(ar_loglik, static_argnums=2)

  def encode_pair(self, context: str, continuation: str):
    context, continuation = _split_pair(context, continuation)
    tok = self.trained.tokenizer
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context) if context else []
    if whole[:len(ctx)] != ctx:  # the boundary merged into one token: score the continuation's own encoding
      whole = ctx + tok.encode(continuation)
    if len(whole) == len(ctx):
      raise UserError(f"continuation {continuation!r} encodes to no tokens; allowed: a non-empty continuation")
    if self.causal and not ctx:
      ctx, whole = [tok.eos_id], [tok.eos_id] + whole  # an AR model needs a position before the first token
    max_len = self.trained.model.config.max_len
    if len(whole) > max_len:
      raise UserError(f"context + continuation is {len(whole)} tokens; allowed: at most the model's max_len "
                      f"{max_len}")
    return np.asarray(whole, np.int32), len(ctx)

  def loglikelihood(self, context: str, continuation: str, index: int = 0) -> tuple[float, bool]:
    """(log p(continuation | context) in nats, whether greedy decoding gives it: AR only, else False).
    Request `index` picks its key stream, so results do not depend on the order requests come in."""
    seq, prompt_len = self.encode_pair(context, continuation)
    params = self.trained.params
    if self.causal:
      total, greedy = self._ar_loglik(params, jnp.asarray(seq), prompt_len)
      return float(total), bool(greedy)
    key = jax.random.fold_in(jax.random.key(self.seed), index)
    if self.trained.model.config.block_size:
      size, target = self.trained.model.config.block_size, len(seq) - prompt_len
      padded = np.full((-(-len(seq) // size) * size,), self.trained.tokenizer.mask_id, np.int32)
      padded[:len(seq)] = seq
      losses = [float(self._block_loss(params, jnp.asarray(padded), prompt_len, target, jax.random.fold_in(key, i)))
                for i in range(self.mc_num // self.batch_size)]
      return -sum(losses) / len(losses), False
    losses = [float(self._mc_loss(params, jnp.asarray(seq), prompt_len, jax.random.fold_in(key, i)))
              for i in range(self.mc_num // self.batch_size)]
    return -sum(losses) / len(losses), False

  def generate_until(self, context: str, until=(), max_gen_toks: int | None = None, index: int = 0) -> str:
    from diffusion_lm import api  # pylint: disable=g-import-not-at-top
    gen = api.generate_tokens(self.trained, prompt=context, max_new_tokens=max_gen_toks or self.max_gen_toks,
                              seed=self.seed + index, **self.settings)
    tok = self.trained.tokenizer
    start = int((gen.template[0] != tok.mask_id).sum())
    text = tok.decode([int(i) for i in gen.output.tokens[0][start:] if int(i) != tok.mask_id], show_mask=False)
    cut = min([text.find(s) for s in until if s and s in text], default=len(text))
    return text[:cut]


def run_tasks(evaluator: Evaluator, path: str, limit: int = 0) -> list[dict]:
  """Scores a local JSON-lines task file; one record per task name."""
  if not paths.exists(path):
    raise UserError(f"--tasks={path!r}: no such file; allowed: a JSON-lines task file")
  rows = []
  for n, line in enumerate(paths.read_bytes(path).decode("utf-8").splitlines()):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except ValueError as e:
        raise UserError(f"{path}:{n + 1} is not JSON ({e}); allowed: one JSON object per line") from None
  scores: dict = {}
  for index, row in enumerate(rows[:limit] if limit else rows):
    kind = row.get("type")
    name = row.get("task", "task")
    if kind == "multiple_choice":
      lls = [evaluator.loglikelihood(row["context"], choice, index=index * 64 + j)[0]
             for j, choice in enumerate(row["choices"])]
      scores.setdefault(name, []).append(float(int(np.argmax(lls)) == int(row["gold"])))
    elif kind == "generate_until":
      text = evaluator.generate_until(row["context"], row.get("until", []), row.get("max_gen_toks"), index=index)
      scores.setdefault(name, []).append(float(text.strip() == str(row["target"]).strip()))
    else:
      raise UserError(f"{path}: request {index} has type={kind!r}; allowed: multiple_choice, generate_until")
  metric = {True: "acc", False: "exact_match"}
  kinds = {row.get("task", "task"): row.get("type") for row in rows}
  return [{"task": name, metric[kinds[name] == "multiple_choice"]: float(np.mean(v)), "n": len(v)}
          for name, v in scores.items()]


def harness_model_class():
  """An lm-evaluation-harness LM over Evaluator (registered as "diffusion_lm" when lm_eval is installed)."""
  try:
    from lm_eval.api.model import LM  # pylint: disable=g-import-not-at-top
  except ImportError:
    LM = object  # noqa: N806  (the same methods, for use without the harness)

  class DiffusionLMHarness(LM):
    """model_args: workdir=W, mc_num, batch_size, seed, max_gen_toks, and sampler settings (sampler=...)."""

    def __init__(self, workdir: str = "", **kwargs):
      if LM is not object:
        super().__init__()
      from diffusion_lm import experiment  # pylint: disable=g-import-not-at-top
      ints = {k: int(kwargs.pop(k)) for k in ("mc_num", "batch_size", "seed", "max_gen_toks") if k in kwargs}
      self.evaluator = Evaluator(experiment.load_trained(workdir), **ints, **kwargs)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
      return [self.evaluator.loglikelihood(*r.args[:2], index=i) for i, r in enumerate(requests)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
      return [self.evaluator.loglikelihood("", r.args[0], index=i)[0] for i, r in enumerate(requests)]

    def generate_until(self, requests, disable_tqdm: bool = False):
      out = []
      for i, r in enumerate(requests):
        context, gen_kwargs = r.args[0], (r.args[1] if len(r.args) > 1 else {})
        until = gen_kwargs.get("until", [])
        out.append(self.evaluator.generate_until(context, [until] if isinstance(until, str) else until,
                                                 gen_kwargs.get("max_gen_toks"), index=i))
      return out

  return DiffusionLMHarness


try:  # register with lm-evaluation-harness when it is installed (`lm_eval --model diffusion_lm`)
  from lm_eval.api.registry import register_model as _register  # pylint: disable=g-import-not-at-top
  _register("diffusion_lm")(harness_model_class())
except ImportError:
  pass


# ----------------------------------------------------------------------------- command line


def define_flags():
  flags.DEFINE_string("workdir", None, "The workdir to evaluate.")
  flags.DEFINE_list("tasks", [], "Local JSON-lines task files.")
  flags.DEFINE_integer("mc_num", 128, "Monte-Carlo samples per log-likelihood (masked diffusion).")
  flags.DEFINE_integer("batch_size", 32, "Monte-Carlo samples per forward pass (divides mc_num).")
  flags.DEFINE_integer("limit", 0, "Score only the first N requests of each file (0 = all).")
  flags.DEFINE_integer("max_gen_toks", 128, "generate_until: tokens to generate at most.")
  flags.DEFINE_integer("seed", 0, "Seed of the Monte-Carlo masks and of the generations.")
  flags.DEFINE_string("sampler", None, "generate_until: the sampler (default: the workdir's).")
  flags.DEFINE_integer("steps", None, "generate_until: denoising steps (default: the workdir's).")
  flags.DEFINE_integer("block_length", None, "generate_until: block length of llada / fast_dllm / blocks (default: "
                       "the workdir's; it must divide max_gen_toks).")


@cli_main
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; allowed: flags only")
  f = flags.FLAGS
  if not f.workdir or not f.tasks:
    raise UserError("lm_eval needs --workdir and --tasks (JSON-lines task files)")
  from diffusion_lm import experiment  # pylint: disable=g-import-not-at-top
  settings = {k: getattr(f, k) for k in ("sampler", "steps", "block_length") if getattr(f, k) is not None}
  evaluator = Evaluator(experiment.load_trained(f.workdir), mc_num=f.mc_num, batch_size=f.batch_size, seed=f.seed,
                        max_gen_toks=f.max_gen_toks, **settings)
  for path in f.tasks:
    for record in run_tasks(evaluator, path, f.limit):
      print(json.dumps({**record, "file": path, "mc_num": f.mc_num}), flush=True)
  sys.stdout.flush()


__all__ = ["Evaluator", "harness_model_class", "llada_mask_counts", "run_tasks"]

if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
