"""`python -m minift.generate`: Generate a reply to one prompt (minift/eval/generate.py)."""
import sys

from minift import cli

if __name__ == "__main__":
    sys.exit(cli.generate())
