"""Constrained field types and the strict base model of every facediff config section."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
UnitFloat = Annotated[float, Field(ge=0, le=1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ConflictingKeys(ValueError):
    """A check across keys (or of a key below the validated model): `keys` (paths inside the validated section)
    are the ones the message names by their full dotted path, so that the loader can say beside each which file
    (or the command line) set it."""

    def __init__(self, message: str, keys: list[tuple[str, ...]]):
        super().__init__(message)
        self.keys = keys
