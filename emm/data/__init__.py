"""What is the data? Declarations, ingestion into Parquet, the schema, and tensors for training.

Names are imported lazily so that ``emm.config`` can import the declaration model without pulling in
ingestion (which itself reads the config types).
"""

from importlib import import_module

_EXPORTS = {
    "DatasetSpec": "emm.data.spec",
    "resolve_dataset": "emm.data.spec",
    "Schema": "emm.data.schema",
    "SplitTensors": "emm.data.tensors",
    "load_split": "emm.data.tensors",
    "ingest": "emm.data.ingest",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
