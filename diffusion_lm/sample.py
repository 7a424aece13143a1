"""Generate text from a trained workdir by iterative unmasking.

  python -m diffusion_lm.sample --workdir=runs/demo --num_samples=4 --steps=64 --prompt="ROMEO."
  python -m diffusion_lm.sample --workdir=runs/demo --sampler=confidence --confidence=margin --steps=32
  python -m diffusion_lm.sample --workdir=runs/demo --infill="To be, or not to be: [MASK*12] the question."
  python -m diffusion_lm.sample --workdir=runs/demo --show --html=denoise.html
  python -m diffusion_lm.sample --workdir=runs/demo --sampler=remdm --remask_schedule=loop --remask_eta=0.02 \
      --remask_t_on=0.55 --remask_t_off=0.05 --steps=256
  python -m diffusion_lm.sample --workdir=runs/demo_block --sampler=threshold --steps=4 --max_new_tokens=512
  python -m diffusion_lm.sample --workdir=runs/llada --prompt="..." --max_new_tokens=128 --sampler=llada \
      --steps=128 --block_length=32   # LLaDA's generate, token for token (an imported LLaDA's default)
  python -m diffusion_lm.sample --workdir=runs/llada --prompt="..." --max_new_tokens=256 --sampler=fast_dllm \
      --threshold=0.9 --block_length=32 --approx_cache=dual   # Fast-dLLM's headline setting
"""

import json
import os
import sys

from absl import app, flags

from diffusion_lm import sampling
from diffusion_lm.errors import UserError, check_seed, cli_main, parse_flags

FLAGS = flags.FLAGS

# Flags that override the checkpoint config's sampling.<name> when given (None: keep the config's).
# A new sampler setting is a flag in define_flags' sampler groups and its name here.
_OVERRIDES = ("steps", "temperature", "top_k", "top_p", "float64", "guidance", "time_grid", "cache", "confidence",
              "commit_schedule", "block_length", "threshold", "remask_schedule", "remask_eta", "remask_t_on",
              "remask_t_off", "remask_alpha_on", "approx_cache", "final_step", "top_p_rule", "factor", "eps",
              "alg_temp", "logits_eos_inf", "confidence_eos_eot_inf", "confidence_rounding")


def define_flags():
  """Defines this command's flags (only when run as a command, so the module imports cleanly)."""
  # What to sample from, and what to generate.
  flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints and the tokenizer.")
  flags.DEFINE_bool("raw_params", False, "Use the raw parameters instead of the EMA parameters.")
  flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16"], "Restore the parameters in this dtype "
                    "(default: float32, as trained; bfloat16 halves their memory).")
  flags.DEFINE_integer("num_samples", 4, "Number of sequences to generate.")
  flags.DEFINE_integer("seq_len", None, "Length of each sequence in tokens (default: data.seq_len).")
  flags.DEFINE_integer("max_new_tokens", None, "Generate up to this many tokens after the prompt (instead of "
                       "--seq_len); block-diffusion and AR models may go past max_len and block models stop at "
                       "the end-of-document token.")
  flags.DEFINE_integer("seed", 0, "Random seed; sequence i uses fold_in(key(seed), i).")
  flags.DEFINE_string("prompt", "", "Text held fixed at the start of every sample.")
  flags.DEFINE_string("suffix", "", "Text held fixed at the end of every sample.")
  flags.DEFINE_string("infill", "", "Text with [MASK] / [MASK*n] marking the tokens to generate.")
  flags.DEFINE_string("chat", "", "A user message: rendered by the model's chat template, the answer printed up to "
                      "its end-of-turn token (instruct models; --max_new_tokens, default 128).")

  # The sampler and the settings every sampler shares (default: the checkpoint config's sampling.*).
  flags.DEFINE_enum("sampler", None, list(sampling.SAMPLERS), "Sampling strategy.")
  flags.DEFINE_integer("steps", None, "Denoising steps T (threshold: the most it may take; block-diffusion "
                       "models: per block).")
  flags.DEFINE_float("temperature", None, "Softmax temperature (0 = argmax).")
  flags.DEFINE_integer("top_k", None, "Keep only the k most likely tokens (0 = off).")
  flags.DEFINE_float("top_p", None, "Nucleus sampling mass in (0, 1] (1 = off).")
  flags.DEFINE_bool("float64", None, "Draw categorical samples with float64 Gumbel noise.")
  flags.DEFINE_float("guidance", None, "Classifier-free guidance weight on the given tokens (0 = off).")
  flags.DEFINE_enum("top_p_rule", None, list(sampling.TOP_P_RULES), "Nucleus rule: within (ReMDM / BD3-LM: "
                    "cumulative mass <= top_p) | reach (transformers); auto: within for ancestral/remdm.")

  # Settings of particular samplers; the help starts with the samplers that read it.
  flags.DEFINE_enum("time_grid", None, list(sampling.TIME_GRIDS), "ancestral/remdm: the time grid.")
  flags.DEFINE_bool("cache", None, "ancestral/remdm: reuse logits after steps that changed nothing.")
  flags.DEFINE_enum("final_step", None, list(sampling.FINAL_STEPS), "ancestral/remdm: argmax (MDLM / ReMDM "
                    "noise removal: grid to t=1e-5, then masks left take an argmax) | sample; auto: argmax, "
                    "sample on block-diffusion models.")
  flags.DEFINE_enum("confidence", None, list(sampling.CONFIDENCES) + list(sampling.CONFIDENCE_ALIASES),
                    "confidence/blocks/threshold/remdm/llada/fast_dllm/dream: how sure a prediction is (the "
                    "references' names: low_confidence, maskgit_plus, topk_margin, origin).")
  flags.DEFINE_enum("commit_schedule", None, list(sampling.COMMIT_SCHEDULES),
                    "confidence/blocks: how many tokens are committed per step.")
  flags.DEFINE_integer("block_length", None, "blocks: tokens per block (must divide seq_len).")
  flags.DEFINE_enum("approx_cache", None, list(sampling.APPROX_CACHES),
                    "blocks on a masked-diffusion model: Fast-dLLM's approximate prefix | dual key/value cache.")
  flags.DEFINE_float("threshold", None, "threshold, fast_dllm: commit predictions at least this confident, in "
                     "(0, 1] (fast_dllm: 0 = off).")
  flags.DEFINE_float("factor", None, "fast_dllm: factor-based parallel decoding (0 = off).")
  flags.DEFINE_float("eps", None, "dream: the time grid's end, linspace(1, eps, steps + 1).")
  flags.DEFINE_float("alg_temp", None, "dream: sample the positions to reveal from softmax(confidence / alg_temp).")
  flags.DEFINE_bool("logits_eos_inf", None, "llada/fast_dllm: never draw the end-of-text token.")
  flags.DEFINE_bool("confidence_eos_eot_inf", None, "llada/fast_dllm: end-of-text/end-of-turn drafts get no "
                    "confidence.")
  flags.DEFINE_integer("confidence_rounding", None, "confidence/blocks/threshold/remdm: round confidences to "
                       "2^-n before ranking (0 = exact).")
  flags.DEFINE_enum("remask_schedule", None, list(sampling.REMASK_SCHEDULES),
                    "remdm: how much to remask per step (ReMDM's cap, rescale, conf and loop).")
  flags.DEFINE_float("remask_eta", None, "remdm: eta of cap (sigma <= eta), rescale (sigma = eta sigma_max), loop.")
  flags.DEFINE_float("remask_t_on", None, "remdm: remask only while t_off < t <= t_on (loop: alpha held there).")
  flags.DEFINE_float("remask_t_off", None, "remdm: end of the remasking window in t.")
  flags.DEFINE_float("remask_alpha_on", None, "remdm loop: alpha held inside the window.")

  # Output.
  flags.DEFINE_bool("show", False, "Animate the unmasking in the terminal.")
  flags.DEFINE_string("html", "", "Write a self-contained HTML page replaying the denoising to this file.")
  flags.DEFINE_bool("json", False, "Print one JSON line per sample instead of text blocks.")
  flags.DEFINE_bool("verbose", False, "Show tracebacks for input errors.")


@cli_main
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; allowed: flags only")
  if not FLAGS.workdir:
    raise UserError("--workdir is required: the training workdir to sample from")
  if FLAGS.num_samples < 1:
    raise UserError(f"--num_samples={FLAGS.num_samples}; allowed: an integer >= 1")
  check_seed(FLAGS.seed, "--seed")
  from diffusion_lm import api, experiment, paths, visualize  # pylint: disable=g-import-not-at-top
  if FLAGS.html and (paths.isdir(FLAGS.html) or (not paths.is_uri(FLAGS.html) and FLAGS.html.endswith(os.sep))):
    raise UserError(f"--html={FLAGS.html} is a directory; allowed: the path of an .html file to write")
  trained = experiment.load_trained(FLAGS.workdir, use_ema=not FLAGS.raw_params, dtype=FLAGS.param_dtype)
  model_config = trained.model.config
  overrides = {name: getattr(FLAGS, name) for name in _OVERRIDES}
  if FLAGS.chat:
    from diffusion_lm import chat  # pylint: disable=g-import-not-at-top
    if FLAGS.prompt or FLAGS.suffix or FLAGS.infill or FLAGS.seq_len:
      raise UserError("--chat renders the whole prompt; allowed: --chat without --prompt/--suffix/--infill/--seq_len")
    answer, gen = chat.reply(trained, chat.load_template(experiment.tokenizer_dir(FLAGS.workdir)),
                             [{"role": "user", "content": FLAGS.chat}], max_new_tokens=FLAGS.max_new_tokens or 128,
                             seed=FLAGS.seed, sampler=FLAGS.sampler,
                             **overrides)
    print(f"# {gen.describe()}; {gen.forward_summary()}\n{answer}", flush=True)
    return
  cached = model_config.causal or model_config.block_size  # lengths vary: each sample says its own
  gen = api.generate_tokens(trained, prompt=FLAGS.prompt, suffix=FLAGS.suffix, infill=FLAGS.infill,
                            num_samples=FLAGS.num_samples, seq_len=FLAGS.seq_len, max_new_tokens=FLAGS.max_new_tokens,
                            seed=FLAGS.seed, sampler=FLAGS.sampler, return_trajectory=bool(FLAGS.show or FLAGS.html),
                            **overrides)
  out, texts, tokens, cfg = gen.output, gen.texts, gen.template, gen.sampler
  meta = gen.describe()
  if FLAGS.show:
    visualize.show_in_terminal(trained.tokenizer, tokens, out.trajectory)
  if FLAGS.json:
    for i, text in enumerate(texts):
      print(json.dumps({"index": i, "text": text, "length": int(out.lengths[i]),
                        "steps_used": int(out.steps_used[i])}), flush=True)
  else:
    print(f"# {meta}; {gen.forward_summary()}", flush=True)
    for i, text in enumerate(texts):
      notes = [f"{int(out.lengths[i])} tokens"] if cached else []
      notes += [f"{int(out.steps_used[i])} steps"] if cfg.name == "threshold" else []
      print(f"--- sample {i}{' (' + ', '.join(notes) + ')' if notes else ''} ---\n{text}", flush=True)
  if FLAGS.html:  # after the samples are printed: a page that cannot be written loses nothing else
    try:
      visualize.write_html(FLAGS.html, trained.tokenizer, tokens, out.trajectory, meta)
    except OSError as e:
      raise UserError(f"--html={FLAGS.html}: cannot write the page ({e.strerror or e}); allowed: a file path in a "
                      "writable folder") from None
    print(f"# wrote {FLAGS.html}", flush=True)
  sys.stdout.flush()


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
