"""`python -m minift.gguf`: Convert a GGUF file into an HF checkpoint folder (minift/model/gguf.py)."""
import sys

from minift import cli

if __name__ == "__main__":
    sys.exit(cli.gguf())
