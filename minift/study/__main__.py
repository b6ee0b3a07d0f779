"""`python -m minift.study`: the study in one command (minift/study/run.py)."""
import sys

from minift import cli

sys.exit(cli.study())
