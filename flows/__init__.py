"""Prefect flows: thin orchestration over ``emm.pipeline``; no logic of their own."""
