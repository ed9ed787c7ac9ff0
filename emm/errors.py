"""One error class for everything a user can get wrong.

Why one class: the CLI catches exactly this type and prints its message without a traceback, so
every message must already say *which* file/column/model is wrong and *what to do*. Bugs in EMM
itself stay ordinary exceptions and keep their tracebacks.
"""


class EMMError(Exception):
    """A user-facing error whose message names the offending file, row, column or model."""
