"""`python -m minift.evaluate`: Evaluate a model on the clinical tasks; `compare A B` tests two runs (minift/eval/)."""
import sys

from minift import cli

if __name__ == "__main__":
    sys.exit(cli.evaluate())
