"""Prefect flows: thin orchestration over ``emm.pipeline`` (and the paper harness, ``harness``); no logic of their own."""
