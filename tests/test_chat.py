"""Chat templates (diffusion_lm/chat.py): rendered as transformers renders them, carried through import and
export, answers cut at the end-of-turn token, `run.chat` and `python -m diffusion_lm.chat` end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import import_llada_instruct

import diffusion_lm
from diffusion_lm import chat, convert, experiment
from diffusion_lm.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# trim_blocks drops the newline after a block tag and lstrip_blocks the spaces before one, as transformers
# renders templates; the expected strings below are written out by hand.
TEMPLATE = ("{% for m in messages %}\n"
            "  {% if m['role'] == 'system' and not loop.first %}{{ raise_exception('system first') }}{% endif %}\n"
            "[{{ m['role'] }}]{{ m['content'] | trim }}{{ eos_token }}\n"
            "{% endfor %}\n"
            "{% if add_generation_prompt %}[assistant]{% endif %}")


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
  return import_llada_instruct(tmp_path_factory.mktemp("chat"), TEMPLATE, max_len=256)


def test_template_renders_as_transformers_does(instruct):
  trained = experiment.load_trained(instruct)
  template = chat.load_template(instruct)
  assert template == TEMPLATE  # copied into the workdir at import
  eos = trained.tokenizer.eos_token
  messages = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "yo"},
              {"role": "user", "content": "ok?"}]
  expected = f"[user]hi{eos}\n[assistant]yo{eos}\n[user]ok?{eos}\n[assistant]"
  assert chat.render(template, messages, trained.tokenizer) == expected
  assert chat.render(template, messages[:1], trained.tokenizer, add_generation_prompt=False) == f"[user]hi{eos}\n"
  with pytest.raises(UserError, match="system first"):
    chat.render(template, messages + [{"role": "system", "content": "x"}], trained.tokenizer)
  with pytest.raises(UserError, match="messages="):
    chat.render(template, [], trained.tokenizer)


def test_answer_stops_at_end_of_turn(instruct):
  tok = experiment.load_trained(instruct).tokenizer
  assert chat.answer_ids([5, 6, tok.eos_id, 7], tok) == [5, 6]
  assert chat.answer_ids([5, tok.mask_id, 7], tok) == [5]
  assert chat.answer_ids([5, 6], tok) == [5, 6]


def test_run_chat_generates_after_the_rendered_conversation(instruct):
  run = diffusion_lm.load(instruct)
  messages = [{"role": "user", "content": "hi"}]
  answer, gen = chat.reply(run.trained, chat.load_template(instruct), messages, max_new_tokens=8, steps=8,
                           block_length=8)
  prompt = run.tokenizer.encode(f"[user]hi{run.tokenizer.eos_token}\n[assistant]")
  np.testing.assert_array_equal(gen.template[0][:len(prompt)], prompt)
  assert gen.template.shape[1] == len(prompt) + 8 and gen.sampler.name == "llada"  # the family's decoder
  ids = chat.answer_ids(gen.output.tokens[0][len(prompt):], run.tokenizer)
  assert answer == run.tokenizer.decode(ids, show_mask=False)
  assert run.chat(messages, max_new_tokens=8, steps=8, block_length=8) == answer


def test_export_keeps_the_template(instruct, tmp_path):
  out = str(tmp_path / "hf")
  convert.export_hf(instruct, out)
  assert chat.read_template(out) == TEMPLATE
  back = str(tmp_path / "back")
  convert.import_hf(out, back, max_len=256)
  assert chat.load_template(back) == TEMPLATE


def test_chat_command_multi_turn(instruct):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", "diffusion_lm.chat", f"--workdir={instruct}", "--max_new_tokens=8",
                        "--steps=8", "--block_length=8"], input="hello\nand again\n\n", capture_output=True,
                       text=True, env=env, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.count("assistant> ") == 2 and "forward passes 8" in out.stdout
  assert "step 8/8: 0 masked" in out.stderr  # the denoising shown as it happens


CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "ok?"},
                {"role": "assistant", "content": "ok"}]


def test_chat_messages_are_sft_pairs_by_the_template(instruct, tmp_path):
  """A conversation gives one pair per assistant turn: the rendered history with the generation prompt,
  then that turn as the template writes it (its end-of-turn token included)."""
  from diffusion_lm import data  # pylint: disable=g-import-not-at-top
  tok = experiment.load_trained(instruct).tokenizer
  eos = tok.eos_token
  path = tmp_path / "chat.jsonl"
  path.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps({"prompt": "a", "response": "b"}) + "\n")
  records = data.read_sft_records(str(path), experiment.chat_renderer(instruct, tok))
  history = f"[system]be brief{eos}\n[user]hi{eos}\n"
  assert [(p, r) for p, r, _ in records] == [
      (history + "[assistant]", f"yo{eos}\n"),
      (history + f"[assistant]yo{eos}\n[user]ok?{eos}\n[assistant]", f"ok{eos}\n"),
      ("a", "b")]
  assert records[0][2] == records[1][2] != records[2][2]  # a conversation's turns share one split
  with pytest.raises(UserError, match="need the model's chat template"):
    data.read_sft_records(str(path))
  path.write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n")
  with pytest.raises(UserError, match="no assistant turn after a prompt"):
    data.read_sft_records(str(path), experiment.chat_renderer(instruct, tok))
  path.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
  with pytest.raises(UserError, match="messages="):
    data.read_sft_records(str(path), experiment.chat_renderer(instruct, tok))


def test_sft_on_chat_messages(instruct, tmp_path):
  """configs/sft.py on {"messages": ...} lines: rows hold the rendered prompt clean and the rendered answer
  scored; the tuned workdir keeps the template and chats."""
  from configs import sft  # pylint: disable=g-import-not-at-top
  from diffusion_lm import data, train  # pylint: disable=g-import-not-at-top
  path = tmp_path / "chat.jsonl"
  others = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(7)]
  path.write_text("\n".join(json.dumps({"messages": m}) for m in [CONVERSATION[1:3]] + others) + "\n")
  config = sft.get_config(instruct)
  config.data.update(path=str(path), validation_percent=50.0, seq_len=48)
  config.training.update(num_steps=1, batch_size=8, log_every=1, checkpoint_every=1)
  config.evaluation.update(batch_size=8, max_batches=1)
  workdir = str(tmp_path / "sft")
  train.train_and_evaluate(config, workdir)
  assert chat.load_template(workdir) == TEMPLATE
  tuned = experiment.load_trained(workdir)
  tok = tuned.tokenizer
  render = experiment.chat_renderer(workdir, tok)
  rows = np.concatenate([data.prompt_response_rows(config.data, split, tok, render=render).rows_NxL
                         for split in ("train", "validation")])
  assert len(rows) == 8
  prompt = tok.encode(f"[user]hi{tok.eos_token}\n[assistant]")
  answer = tok.encode(f"yo{tok.eos_token}\n")
  (row,) = [r for r in rows if (r[:len(prompt)] == [~i for i in prompt]).all()]
  np.testing.assert_array_equal(row[:len(prompt)], [~i for i in prompt])
  np.testing.assert_array_equal(row[len(prompt):len(prompt) + len(answer)], answer)
  assert (row[len(prompt) + len(answer):] == tok.eos_id).all()
  answer_text, _ = chat.reply(tuned, TEMPLATE, CONVERSATION[1:2], max_new_tokens=8, steps=8, block_length=8)
  assert isinstance(answer_text, str)
