"""What the scripts/ front ends share: a user mistake ends as one line, exit code 2."""

# Errors that come from what the user passed (a path, a file, a flag, a missing extra),
# as opposed to bugs, which keep their traceback.
USER_ERRORS = (ValueError, OSError, ImportError)


def first_line(err):
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def fail(parser, err):
    """Exit like argparse does on a bad flag, without repeating the usage text."""
    parser.exit(2, f"{parser.prog}: error: {first_line(err)}\n")
