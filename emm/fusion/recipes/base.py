"""What every fusion recipe stands on: ``Recipe``, a named piece of behaviour, and ``Registry``, the recipes of
one kind keyed by the string ``params.yaml`` and ``fused.json`` name them by.

Why registries: a recipe used to be a string compared wherever its behaviour differed, and its allowed values
were listed twice. Now the registry is the one declaration: ``AKFOptions`` validates against its keys, the
model looks its parts up in it, and adding a recipe is one class plus one ``register`` line (the shape of
mergekit's ``MergeMethod`` registry or LibMTL's ``AbsWeighting``).

Why a recipe holds no tensors: the modules a recipe builds are registered on the fused model under the names
its state dict has always had, so saved ``fused.safetensors`` files load as before; a recipe instance is
behaviour only, can be shared, and never lands in a state dict.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Generic, TypeVar

from emm.errors import EMMError


class Recipe:
    """A named piece of fusion behaviour; ``name`` is its registry key (set by ``Registry.register``)."""

    name: ClassVar[str] = ""


R = TypeVar("R", bound=Recipe)


class Registry(dict[str, type[R]], Generic[R]):
    """The recipes of one kind (one option of ``AKFOptions``), keyed by the option's value, in declaration order
    (the order error messages and the params schema list them in).

    A plain dict underneath, so a test can add and remove a recipe (``del registry[name]``).
    """

    def __init__(self, option: str, base: type[R]) -> None:
        super().__init__()
        self.option = option
        self.base = base

    def register(self, name: str) -> Callable[[type[R]], type[R]]:
        """Class decorator: add the class under ``name`` (its config string)."""

        def add(cls: type[R]) -> type[R]:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"a {self.option} recipe must subclass {self.base.__name__}, got {cls!r}")
            if name in self:
                raise EMMError(f"{self.option} {name!r} is already registered ({self[name].__qualname__}); "
                               "pick another name")
            cls.name = name
            self[name] = cls
            return cls

        return add

    def resolve(self, choice: str | R) -> R:
        """The one lookup from a config string to behaviour: a fresh instance of the recipe named ``choice``
        (a recipe instance passes through)."""
        if isinstance(choice, self.base):
            return choice
        cls = self.get(choice) if isinstance(choice, str) else None
        if cls is None:
            raise EMMError(f"{self.option} must be one of {', '.join(self)}, got {choice!r}")
        return cls()
