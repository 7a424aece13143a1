"""Chat with an instruct model: its chat template rendered as transformers renders it, answers by diffusion.

  python -m diffusion_lm.chat --workdir=runs/llada_instruct [--max_new_tokens=128] [--sampler=llada --steps=128]

The template is the checkpoint's own (`chat_template` in its tokenizer_config.json, or chat_template.jinja),
copied into the workdir by `convert --from_hf` and written back by `convert --to_hf`. It is rendered with
jinja2 in a sandbox with trim_blocks / lstrip_blocks, `raise_exception` and the tokenizer's special tokens,
as transformers' `apply_chat_template` does; the rendered text is encoded without adding special tokens.
Each answer is the generated text up to the first end-of-turn or end-of-text token.

Multi-turn in the terminal: each turn renders the whole conversation with add_generation_prompt=True and
denoises max_new_tokens after it, showing the unmasking as it happens (--show, on by default); an empty
line or end of input quits, `/reset` starts over.
"""

import json
import os
import sys

from absl import app, flags

from diffusion_lm import paths
from diffusion_lm.errors import UserError, cli_main, parse_flags

TEMPLATE_FILE = "chat_template.jinja"
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "[SEP]", "</s>")


def read_template(folder: str) -> str:
  """A Hugging Face folder's chat template ('' when it has none): chat_template.jinja, else the
  tokenizer_config.json key (a string, or a list of named templates of which 'default' is taken)."""
  jinja = os.path.join(folder, TEMPLATE_FILE)
  if os.path.isfile(jinja):
    with open(jinja, encoding="utf-8") as f:
      return f.read()
  config = os.path.join(folder, "tokenizer_config.json")
  if not os.path.isfile(config):
    return ""
  try:
    with open(config, encoding="utf-8") as f:
      template = json.load(f).get("chat_template") or ""
  except (OSError, ValueError) as e:
    raise UserError(f"{config} is not valid JSON ({e}); allowed: a tokenizer_config.json") from e
  if isinstance(template, list):
    named = {t.get("name"): t.get("template", "") for t in template if isinstance(t, dict)}
    template = named.get("default", next(iter(named.values()), ""))
  if not isinstance(template, str):
    raise UserError(f"{config}: chat_template is {type(template).__name__}; allowed: a string or named templates")
  return template


def save_template(directory: str, template: str) -> None:
  if template:
    paths.write_bytes(paths.join(directory, TEMPLATE_FILE), template.encode("utf-8"))


def load_template(directory: str) -> str:
  path = paths.join(directory, TEMPLATE_FILE)
  return paths.read_bytes(path).decode("utf-8") if paths.exists(path) else ""


def check_messages(messages) -> list[dict]:
  if not isinstance(messages, (list, tuple)) or not messages:
    raise UserError(f"messages={messages!r}; allowed: a non-empty list of {{'role': ..., 'content': ...}}")
  for m in messages:
    if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
      raise UserError(f"message {m!r}; allowed: a dict with string 'role' and 'content'")
  return list(messages)


def render(template: str, messages, tokenizer, add_generation_prompt: bool = True) -> str:
  """The conversation as the model's template writes it (transformers' apply_chat_template, tokenize=False)."""
  if not template:
    raise UserError("this workdir has no chat template; allowed: an instruct model imported with its "
                    "tokenizer_config.json chat_template (or chat_template.jinja)")
  import jinja2  # pylint: disable=g-import-not-at-top
  from jinja2 import sandbox  # pylint: disable=g-import-not-at-top

  def raise_exception(message):
    raise UserError(f"the chat template refused the conversation: {message}")

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=["jinja2.ext.loopcontrols"])
  env.globals["raise_exception"] = raise_exception
  try:
    compiled = env.from_string(template)
  except jinja2.TemplateError as e:
    raise UserError(f"the chat template does not parse: {e}") from None
  special = {"eos_token": getattr(tokenizer, "eos_token", ""), "bos_token": _token(tokenizer, "bos_id")}
  return compiled.render(messages=check_messages(messages), add_generation_prompt=add_generation_prompt, **special)


def _token(tokenizer, attr: str) -> str:
  i = getattr(tokenizer, attr, None)
  tok = getattr(tokenizer, "tok", None)
  return tok.id_to_token(i) if (i is not None and tok is not None) else ""


def stop_ids(tokenizer) -> set:
  """Ids that end an answer: the end-of-text token and the vocabulary's end-of-turn tokens."""
  ids = {tokenizer.eos_id}
  tok = getattr(tokenizer, "tok", None)
  for text in END_OF_TURN:
    found = tok.token_to_id(text) if tok is not None else None
    if found is not None:
      ids.add(int(found))
  return ids


def answer_ids(generated, tokenizer) -> list:
  """The generated ids up to (not including) the first end-of-turn / end-of-text / [MASK] id."""
  stops = stop_ids(tokenizer) | {tokenizer.mask_id}
  out = []
  for i in generated:
    if int(i) in stops:
      break
    out.append(int(i))
  return out


def reply(trained, template: str, messages, *, max_new_tokens: int = 128, seed: int = 0, generators=None,
          return_trajectory: bool = False, **settings):
  """(answer text, Generation) for the conversation; settings as api.generate_tokens takes them."""
  from diffusion_lm import api  # pylint: disable=g-import-not-at-top
  text = render(template, messages, trained.tokenizer)
  gen = api.generate_tokens(trained, prompt=text, max_new_tokens=max_new_tokens, seed=seed, generators=generators,
                            return_trajectory=return_trajectory, **settings)
  start = int((gen.template[0] != trained.tokenizer.mask_id).sum())
  return trained.tokenizer.decode(answer_ids(gen.output.tokens[0][start:], trained.tokenizer),
                                  show_mask=False), gen


# ----------------------------------------------------------------------------- command line


def define_flags():
  flags.DEFINE_string("workdir", None, "A workdir of an instruct model (imported with its chat template).")
  flags.DEFINE_integer("max_new_tokens", 128, "Tokens each answer may take.")
  flags.DEFINE_string("sampler", None, "Sampler (default: the workdir's, e.g. llada for an imported LLaDA).")
  flags.DEFINE_integer("steps", None, "Denoising steps (default: the workdir's).")
  flags.DEFINE_integer("block_length", None, "Block length of the llada / fast_dllm / blocks samplers.")
  flags.DEFINE_integer("seed", 0, "Random seed.")
  flags.DEFINE_bool("show", True, "Show each answer's unmasking as it happens.")
  flags.DEFINE_string("system", "", "A system message opening the conversation.")


@cli_main
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; allowed: flags only")
  f = flags.FLAGS
  if not f.workdir:
    raise UserError("--workdir is required: an instruct model's workdir")
  from diffusion_lm import api, experiment, visualize  # pylint: disable=g-import-not-at-top
  trained = experiment.load_trained(f.workdir)
  template = load_template(experiment.tokenizer_dir(f.workdir))
  render(template, [{"role": "user", "content": "hi"}], trained.tokenizer)  # fails now, not after the question
  settings = {k: getattr(f, k) for k in ("sampler", "steps", "block_length") if getattr(f, k) is not None}
  generators = api._Generators(trained)  # pylint: disable=protected-access
  opening = [{"role": "system", "content": f.system}] if f.system else []
  messages = list(opening)
  print("chat: an empty line quits, /reset starts over", flush=True)
  for line in sys.stdin:
    line = line.rstrip("\n")
    if not line:
      break
    if line == "/reset":
      messages = list(opening)
      continue
    messages.append({"role": "user", "content": line})
    answer, gen = reply(trained, template, messages, max_new_tokens=f.max_new_tokens, seed=f.seed,
                        generators=generators, return_trajectory=f.show, **settings)
    if f.show:
      visualize.show_in_terminal(trained.tokenizer, gen.template, gen.output.trajectory, out=sys.stderr)
    print(f"assistant> {answer}\n# {gen.forward_summary()}", flush=True)
    messages.append({"role": "assistant", "content": answer})


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
