"""Dataset declarations: what a raw table looks like and how it becomes features and labels.

Why declarations instead of per-dataset code: a user brings their own CSV/Parquet by writing a few
lines in ``params.yaml``; the three paper datasets are just built-in declarations of the same kind
(``emm/data/builtin/*.yaml``), so every dataset goes through one audited ingestion path.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from emm.errors import EMMError

SPLITS = ("train", "val", "test")


# Quantile bins per dense column unless a declaration says otherwise (README "Data" has the measurement).
DEFAULT_DENSE_BUCKETS = 32

class TaskSpec(BaseModel):
    """One binary task: which raw column holds its label and which values count as positive."""

    model_config = ConfigDict(extra="forbid")

    column: str
    positive_values: list[str] | None = Field(
        default=None, description="label = 1 where the stripped raw value is one of these"
    )
    negative_values: list[str] | None = Field(
        default=None, description="with positive_values: label = 0 for these; any other value is refused at "
        "ingest (without this list every value that is not positive counts as 0)"
    )
    threshold: float | None = Field(default=None, description="label = 1 where float(value) > threshold")
    missing_values: list[str] | None = Field(
        default=None, description="raw values meaning 'no label for this task on this row' (e.g. [\"\"]); compared "
        "after the reader strips whitespace. Such rows keep their features and every other task's label; this "
        "task's losses and metrics skip them. Without this list an empty label is an error"
    )
    description: str = ""

    @model_validator(mode="after")
    def _one_rule(self) -> "TaskSpec":
        if (self.positive_values is None) == (self.threshold is None):
            raise ValueError(f"task on column {self.column!r}: give exactly one of positive_values or threshold")
        if self.negative_values is not None:
            if self.positive_values is None:
                raise ValueError(f"task on column {self.column!r}: negative_values needs positive_values "
                                 f"(a threshold rule already says what is negative)")
            both = sorted(set(self.positive_values) & set(self.negative_values))
            if both:
                raise ValueError(f"task on column {self.column!r}: value(s) declared both positive and negative: "
                                 f"{both}")
        if self.missing_values is not None:
            self.missing_values = [v.strip() for v in self.missing_values]
            taken = sorted(set(self.missing_values) & (set(self.positive_values or ()) | set(self.negative_values or ())))
            if taken:
                raise ValueError(f"task on column {self.column!r}: value(s) {taken} declared both missing and "
                                 f"positive/negative")
        return self


class CarveSpec(BaseModel):
    """How a missing split is carved out of a given file (stratified by one task, fixed seed)."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["train", "test"] = Field(description="the file whose rows are split")
    into: tuple[str, str] = Field(description="(split that gets `fraction` of the rows, split that keeps the rest)")
    fraction: float = Field(gt=0, lt=1)
    stratify: str | None = Field(default=None, description="task name to stratify by")


class DownloadSpec(BaseModel):
    """Where `emm fetch-data` gets the raw files when no local mirror is given."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, description="a .zip/.tar.gz/.gz or plain file; None = manual download")
    instructions: str = ""


class DatasetSpec(BaseModel):
    """A declared raw dataset. See README "Your own dataset" for a worked example."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    format: Literal["csv", "parquet"] = "csv"
    files: dict[str, str | list[str]] = Field(
        description="file key (train/val/test) -> file name inside the raw folder, or candidate names "
        "tried in order (e.g. the full file, then the published sample); NAME.gz is accepted for NAME"
    )
    header: bool = True
    columns: list[str] | None = Field(
        default=None, description="all column names in file order (required when header: false; checked when true)"
    )
    delimiter: str = ","
    drop: list[str] = Field(default_factory=list, description="columns read but never used")
    dense: list[str] = Field(default_factory=list)
    sparse: list[str] | Literal["rest"] = Field(
        default="rest", description="'rest' = every column that is not dense, dropped, or a selected task's label"
    )
    tasks: dict[str, TaskSpec]
    default_tasks: list[str]
    carve: CarveSpec | None = None
    fit_on: list[str] = Field(
        default_factory=lambda: ["train"],
        description="file keys whose rows fit the vocabularies and min-max ranges",
    )
    dense_missing: Literal["error", "zero"] = "error"
    dense_buckets: int = Field(
        default=DEFAULT_DENSE_BUCKETS, ge=0,
        description="also give every dense column a sparse feature <column>_bucket: its bin among this many "
        "quantile bins fitted on fit_on (0 = off, the paper's protocol). On unless turned off, so a declared "
        "dataset gets the numeric encoding the built-in Census one is measured with. See emm.data.encoding.",
    )
    sha256: dict[str, str] = Field(
        default_factory=dict, description="expected sha256 per file name, of the decompressed content"
    )
    download: DownloadSpec | None = Field(default=None, description="official source, used by `emm fetch-data`")

    @model_validator(mode="after")
    def _consistent(self) -> "DatasetSpec":
        unknown = set(self.files) - set(SPLITS)
        if unknown:
            raise ValueError(f"files: unknown split key(s) {sorted(unknown)}; use train/val/test")
        if "train" not in self.files:
            raise ValueError("files: a 'train' file is required")
        produced = set(self.files) | (set(self.carve.into) if self.carve else set())
        if produced != set(SPLITS):
            raise ValueError(
                f"files + carve must produce exactly train/val/test, they produce {sorted(produced)}"
            )
        if self.carve and self.carve.source not in self.files:
            raise ValueError(f"carve.source {self.carve.source!r} is not among files")
        if not self.header and not self.columns:
            raise ValueError("header: false needs the list of columns")
        bad_fit = set(self.fit_on) - set(self.files)
        if bad_fit:
            raise ValueError(f"fit_on names file keys that do not exist: {sorted(bad_fit)}")
        if self.dense_buckets == 1:
            raise ValueError("dense_buckets: 1 bin carries no information; use 0 (off) or at least 2")
        missing = [t for t in self.default_tasks if t not in self.tasks]
        if missing:
            raise ValueError(f"default_tasks names undeclared task(s): {missing}")
        return self

    def select_tasks(self, names: list[str] | None) -> dict[str, TaskSpec]:
        """The tasks to build, in order; refuses unknown names."""
        names = list(names or self.default_tasks)
        unknown = [n for n in names if n not in self.tasks]
        if unknown:
            raise EMMError(
                f"dataset {self.name!r} declares tasks {sorted(self.tasks)}; unknown task(s) {unknown}"
            )
        if len(set(names)) != len(names):
            raise EMMError(f"dataset {self.name!r}: task list {names} repeats a task")
        return {n: self.tasks[n] for n in names}


def builtin_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("emm.data").joinpath("builtin").iterdir()
                  if p.name.endswith(".yaml"))


def builtin_path(name: str) -> Path:
    """File of a built-in declaration (DVC lists it as a dependency of the ingest stage)."""
    return Path(str(resources.files("emm.data").joinpath("builtin", f"{name}.yaml")))


def resolve_dataset(name: str, user_declarations: dict[str, DatasetSpec] | None = None) -> DatasetSpec:
    """A user's declaration in params.yaml wins over a built-in one of the same name."""
    user_declarations = user_declarations or {}
    if name in user_declarations:
        return user_declarations[name]
    if name in builtin_names():
        raw = yaml.safe_load(builtin_path(name).read_text())
        return DatasetSpec.model_validate(raw)
    known = sorted(set(builtin_names()) | set(user_declarations))
    raise EMMError(f"unknown dataset {name!r}: known datasets are {known}; declare your own under "
                   f"'datasets:' in params.yaml")
