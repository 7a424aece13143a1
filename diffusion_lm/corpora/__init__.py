"""Corpora shipped with the package."""

import os

CORPORA_DIR = os.path.dirname(os.path.abspath(__file__))
SHAKESPEARE_DIR = os.path.join(CORPORA_DIR, "shakespeare")
