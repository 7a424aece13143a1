"""Make the denoising visible: terminal animation and a self-contained HTML replay."""

import html
import json
import sys
import time

MASK_GLYPH = "\u2591"  # light shade: one masked token


def frame_tokens(tokenizer, row) -> list:
  """Per-position token texts of one sequence; None where masked."""
  return [None if int(i) == tokenizer.mask_id else tokenizer.token_text(int(i)) for i in row]


def render_text(tokens: list) -> str:
  return "".join(MASK_GLYPH if t is None else t for t in tokens)


def show_in_terminal(tokenizer, initial_BxL, trajectory_SxBxL, delay: float = 0.08, out=None) -> None:
  """Animates each sequence's unmasking: redraws in place on a terminal, prints every frame otherwise."""
  out = out or sys.stdout
  interactive = out.isatty()
  frames = [initial_BxL] + list(trajectory_SxBxL)
  for step, frame in enumerate(frames):
    masked = sum(int((row == tokenizer.mask_id).sum()) for row in frame)
    body = "\n".join(f"[{b}] {render_text(frame_tokens(tokenizer, row))}" for b, row in enumerate(frame))
    header = f"step {step}/{len(frames) - 1}: {masked} masked"
    if interactive:
      out.write("\x1b[H\x1b[2J" + header + "\n" + body + "\n")
      out.flush()
      time.sleep(delay)
    else:
      out.write(f"=== {header}\n{body}\n")
  out.flush()


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>diffusion_lm: denoising replay</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; }}
.seq {{ font-family: ui-monospace, monospace; white-space: pre-wrap; border: 1px solid #ccc;
        padding: .6em; margin: .6em 0; line-height: 1.5; }}
.m {{ background: #ddd; color: #ddd; border-radius: 2px; }}
.new {{ background: #ffe08a; }}
#controls {{ position: sticky; top: 0; background: white; padding: .5em 0; }}
</style></head><body>
<h2>Denoising replay</h2>
<p>{meta}</p>
<div id="controls"><button id="play">play</button>
<input id="step" type="range" min="0" max="{last}" value="0" style="width:40em">
<span id="label"></span></div>
<div id="seqs"></div>
<script>
const frames = {frames};
const seqs = document.getElementById("seqs"), slider = document.getElementById("step");
const label = document.getElementById("label");
function esc(s) {{ return s.replace(/&/g,"&amp;").replace(/</g,"&lt;").replace(/>/g,"&gt;"); }}
function draw(s) {{
  const cur = frames[s], prev = frames[Math.max(0, s - 1)];
  let masked = 0, html = "";
  cur.forEach((row, b) => {{
    html += '<div class="seq">' + row.map((tok, i) => {{
      if (tok === null) {{ masked++; return '<span class="m">\u2591</span>'; }}
      const fresh = s > 0 && prev[b][i] === null;
      return fresh ? '<span class="new">' + esc(tok) + '</span>' : esc(tok);
    }}).join("") + "</div>";
  }});
  seqs.innerHTML = html;
  label.textContent = "step " + s + " / " + (frames.length - 1) + ", " + masked + " masked";
}}
slider.oninput = () => draw(+slider.value);
let timer = null;
document.getElementById("play").onclick = () => {{
  if (timer) {{ clearInterval(timer); timer = null; return; }}
  if (+slider.value >= frames.length - 1) slider.value = 0;
  timer = setInterval(() => {{
    if (+slider.value >= frames.length - 1) {{ clearInterval(timer); timer = null; return; }}
    slider.value = +slider.value + 1; draw(+slider.value);
  }}, 120);
}};
draw(0);
</script></body></html>
"""


def write_html(path: str, tokenizer, initial_BxL, trajectory_SxBxL, meta: str = "") -> None:
  """A single HTML file (no external assets) that replays the denoising step by step."""
  frames = [[frame_tokens(tokenizer, row) for row in frame] for frame in [initial_BxL] + list(trajectory_SxBxL)]
  page = _PAGE.format(meta=html.escape(meta), last=len(frames) - 1,
                      frames=json.dumps(frames).replace("</", "<\\/"))
  from diffusion_lm.tokenizers import atomic_write_bytes  # pylint: disable=g-import-not-at-top
  atomic_write_bytes(path, page.encode("utf-8"))
