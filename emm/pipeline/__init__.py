"""The pipeline: one module per stage, over the library packages (data, models, train, fusion).

ingest -> pretrain -> decompose -> fuse -> evaluate -> register/promote, plus predict. (The paper's
experiments, ``emm benchmark``, run over these stages from outside the library: harness/.)
Each stage module reads params.yaml (``params``), calls the library, writes the stage's own folder
(``layout``) and logs through a Tracker. The CLI (and so ``dvc repro``) and the Prefect flows call these
same functions; ``cache`` derives the flows' cache keys from the stage table that dvc.yaml mirrors.
"""
