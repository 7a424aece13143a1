"""Conditioning: the initial row of a sample from a prompt, a suffix or an infill template."""

import re

import numpy as np

from diffusion_lm.errors import UserError

_MASK_RUN = re.compile(r"\[MASK(?:\*(\d+))?\]")
_MASK_LIKE = re.compile(r"\[\s*mask\b[^\]]*\]", re.IGNORECASE)  # whatever a user may have meant as a hole


def template_tokens(tokenizer, seq_len: int, prompt: str = "", suffix: str = "", infill: str = ""):
  """The initial int32[seq_len] row: given tokens from prompt/suffix/infill, [MASK] elsewhere.

  `infill` is text with [MASK] (one token) or [MASK*n] (n tokens) marking what to generate, e.g.
  "To be, or not to be: [MASK*24] the question."; it fills the row from the start and any positions
  after it are generated too. `prompt` is a prefix and `suffix` ends the row.
  """
  if infill and (prompt or suffix):
    raise UserError("--infill already gives the whole sequence; allowed: --infill alone, or --prompt/--suffix")
  row = np.full((seq_len,), tokenizer.mask_id, np.int32)
  if infill:
    for m in _MASK_LIKE.finditer(infill):  # a mistyped hole would otherwise be kept as literal text
      if not _MASK_RUN.fullmatch(m.group(0)):
        raise UserError(f"infill hole {m.group(0)!r} is malformed; allowed: [MASK] or [MASK*n] with n an integer "
                        ">= 1, in capitals")
    if not _MASK_RUN.search(infill):
      raise UserError(f"infill text {infill[:40]!r} has no [MASK] or [MASK*n]; allowed: text with at least one")
    ids, pos = [], 0
    for m in _MASK_RUN.finditer(infill):
      ids += tokenizer.encode(infill[pos:m.start()]) if m.start() > pos else []
      n = int(m.group(1) or 1)
      if n < 1:
        raise UserError(f"[MASK*{n}] in infill; allowed: n >= 1")
      ids += [tokenizer.mask_id] * n
      pos = m.end()
    ids += tokenizer.encode(infill[pos:]) if pos < len(infill) else []
    if len(ids) > seq_len:
      raise UserError(f"infill is {len(ids)} tokens, longer than seq_len={seq_len}; allowed: at most {seq_len}")
    row[:len(ids)] = ids
    return row
  head = tokenizer.encode(prompt) if prompt else []
  tail = tokenizer.encode(suffix) if suffix else []
  if len(head) + len(tail) > seq_len:
    what = "prompt" if not tail else ("suffix" if not head else "prompt + suffix")
    raise UserError(f"{what} is {len(head) + len(tail)} tokens, longer than seq_len={seq_len}; allowed: at "
                    f"most {seq_len} tokens")
  row[:len(head)] = head
  if tail:
    row[seq_len - len(tail):] = tail
  return row


def prompt_tokens(tokenizer, prompt: str, seq_len: int, num_samples: int):
  """int32[num_samples, seq_len]: the encoded prompt as a prefix, the rest [MASK]."""
  return np.tile(template_tokens(tokenizer, seq_len, prompt=prompt), (num_samples, 1))
