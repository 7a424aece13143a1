"""Writes the synthetic instruction task of configs/sft_tiny.py: prompt "abcd=", response "dcba".

  python tools/make_reverse_task.py /tmp/reverse.jsonl [--pairs=4000]

Words are 4 letters drawn from "abcdef" (seeded, so the file is always the same).
"""

import argparse
import json

import numpy as np

LETTERS = "abcdef"


def reverse_pairs(num: int, seed: int = 0, length: int = 4) -> list[dict]:
  rng = np.random.default_rng(seed)
  words = ("".join(LETTERS[i] for i in rng.integers(0, len(LETTERS), length)) for _ in range(num))
  return [{"prompt": f"{w}=", "response": w[::-1]} for w in words]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("path")
  parser.add_argument("--pairs", type=int, default=4000)
  args = parser.parse_args()
  with open(args.path, "w") as f:
    for pair in reverse_pairs(args.pairs):
      f.write(json.dumps(pair) + "\n")


if __name__ == "__main__":
  main()
