"""The ``cartridges`` command's exit codes and its Ctrl-C line. Free of imports on purpose: the command reports an
interrupt that lands while it is still importing everything else."""

from __future__ import annotations

import sys

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNAVAILABLE = 4
EXIT_INPUT = 65  # the trainer's permanent input error (contract.EXIT_PERMANENT)
EXIT_INTERRUPTED = 130
EXIT_CODES = f"""exit codes:
  {EXIT_OK}    success
  {EXIT_FAILURE}    failure (training, serving or an unexpected error)
  {EXIT_USAGE}    bad arguments
  {EXIT_NOT_FOUND}    a file, cartridge or model that does not exist
  {EXIT_UNAVAILABLE}    the object store or the server cannot be reached
  {EXIT_INPUT}   unusable input: a corpus that is not UTF-8 text or empty, a cartridge for another model or
       altered in the store (a sha256 mismatch, a current.json leaving its prefix)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)"""


def interrupted(resumes: bool = False) -> int:
    """Say that Ctrl-C stopped the command (and, for one that resumes, that running it again resumes)."""
    suffix = "; the same command again resumes where it stopped" if resumes else ""
    print(f"cartridges: interrupted{suffix}", file=sys.stderr)
    return EXIT_INTERRUPTED
