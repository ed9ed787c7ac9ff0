"""The paper's experiments (Table I, Table II, Figure 3) on one dataset: what ``emm benchmark`` runs.

- ``data``: the task sets' ingested data (optionally the first N raw rows, for quick profiles);
- ``jobs``: one training run each (a pool model, a baseline, LightGBM, a fused variant), run in worker
  processes and cached on disk, so an interrupted benchmark resumes where it stopped;
- ``runner``: schedules the jobs over the seeds, decomposes each seed's pool, logs to MLflow;
- ``members``: which of a seed's pool members a fused job fuses (the whole pool, tree members joining at the
  output, or its networks alone);
- ``report``: tables (markdown + CSV), plots, the fusion-gate selection heat maps;
- ``paper``: the published numbers printed beside ours;
- ``relatedness*``: the planted-relatedness sweep (``emm relatedness``) on the same jobs.
The entry points are in ``stages``. (Speed benchmarks are the scripts in ``harness/benchmarks/``.)
"""
