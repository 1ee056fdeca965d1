"""The one exception class for bad input: a config, a flag or a file the user named.

Every command line turns an InputError into one line on stderr and exit status 2 (before any
compilation or dataset scan where it can); the Python API raises the same message. Anything
else that escapes is a bug and keeps its traceback. Importing this module imports nothing.
"""


class InputError(ValueError):
  """Bad input (config field, flag, file, directory): the message says what to do."""


# A run that SIGTERM (preemption) stopped after saving its checkpoint: EX_TEMPFAIL, "try again".
PREEMPTED_EXIT_STATUS = 75
# A bad command line or input.
INPUT_EXIT_STATUS = 2
# Ctrl-C that reached a command line (128 + SIGINT, as a shell reports it).
INTERRUPTED_EXIT_STATUS = 130
