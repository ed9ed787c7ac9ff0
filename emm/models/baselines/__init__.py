"""Multi-task baselines the fused model must beat, one module each, all on the shared trainer."""
