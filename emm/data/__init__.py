"""What is the data? Declarations, the chunked reader and encoder, ingestion into Parquet, the schema, tensors.

Kept free of eager imports so that ``emm --help`` and settings loading stay fast; import the module you
need (``emm.data.schema``, ``emm.data.ingest``, ...).
"""
