"""What a pool member's name may be: the one rule every kind of pool entry is checked against.

Why a rule at all: the name becomes a folder (``pool-work/<name>/``, removed and rewritten by the pretrain
stage), a file (``pool/<name>.safetensors``) and an MLflow run name. A name that is a path (``/abs``,
``../x``, ``a/b``, ``""``) made the stage remove folders outside its own; names with other characters fail
on some filesystems or in MLflow. So a name is a plain, portable file name, checked once when params.yaml
is parsed, and compared case-insensitively (``M`` and ``m`` are one file on macOS and Windows).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

MAX_NAME_LENGTH = 64
NAME_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME_LENGTH - 1}}}")
VALID_NAME = (f"a valid name is 1 to {MAX_NAME_LENGTH} ASCII letters, digits, '.', '_' or '-', starting with a "
              "letter or digit, with no '..' (e.g. income-mlp)")


def check_name(name: str) -> str:
    """``name`` unchanged when it is a valid member name; else ValueError saying why and what is valid.

    Raises ValueError (not EMMError) so pydantic validators can use it: ``parse_member`` turns the
    validation error into an EMMError that names the params entry.
    """
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise ValueError(f"name {name!r} cannot be a pool member name (it names a folder in pool-work/, a file in "
                         f"pool/ and an MLflow run); {VALID_NAME}")
    return name


def name_key(name: str) -> str:
    """The form two names are compared in: equal keys would share one file on a case-insensitive filesystem."""
    return name.casefold()


MemberName = Annotated[str, AfterValidator(check_name)]  # the field type of every pool entry's ``name``
