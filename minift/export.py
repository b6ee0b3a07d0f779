"""`python -m minift.export`: Export a checkpoint (+ LoRA adapter) as GGUF for llama.cpp (minift/model/export.py)."""
import sys

from minift import cli

if __name__ == "__main__":
    sys.exit(cli.export())
