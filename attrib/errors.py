"""The library's one input-error type.

Every check of a user's argument, model or data raises :class:`InputError` (a ``ValueError``) or
:class:`InputTypeError` (also a ``TypeError``), so callers and the command line can tell bad input
from a bug: anything else that escapes is a bug and keeps its traceback.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input, named in one line (the argument and what is wrong with it).

    >>> try: IntegratedGradients(model).attribute(x, n_steps=0)
    ... except InputError as error: print(error)   # n_steps must be a positive int, got 0
    """


class InputTypeError(InputError, TypeError):
    """Bad input of the wrong type.

    >>> isinstance(InputTypeError('inputs must be a tensor'), (ValueError, TypeError))   # True
    """
