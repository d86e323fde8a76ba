"""The one error type the data layer raises for bad input."""


class DataError(ValueError):
  """Bad or missing data. The message names the file and what is wrong.

  The CLI prints ``str(err)`` on one line of stderr and exits non-zero, with
  no traceback, so every message must say what to do about it.
  """
