"""Prefect flows: thin orchestration over ``emm.stages``; no logic of their own."""
