"""One error type for bad input, so that command-line tools can print one line instead of a traceback."""


class MinifTError(ValueError):
    """Bad input from the user: a file, a row, a tensor or an argument. The message names it."""


def run_cli(main):
    """Run a command-line entry point: bad input prints one `error: ...` line and exits 2, no traceback."""
    import sys

    from minift.kernels import KernelError

    try:
        return main()
    except (MinifTError, KernelError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
