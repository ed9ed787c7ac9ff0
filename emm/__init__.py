"""EMM: build a multi-task model by fusing already-trained single-task models.

Pipeline stages (each a plain function, callable from notebooks, the CLI, DVC and Prefect):
ingest -> pretrain -> decompose -> fuse -> evaluate -> register/promote.
"""

from emm.errors import EMMError

__all__ = ["EMMError"]
__version__ = "0.1.0"
