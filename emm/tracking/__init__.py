"""Where do runs and models go? MLflow, behind the ``emm.tracker.Tracker`` protocol.

This package is the only place that imports mlflow (an import contract in CI keeps it so):
- ``store``: the tracking/registry URI, one experiment per dataset, which errors are transient;
- ``runs``: ``MlflowTracker`` (the Tracker the stages are handed) and runs addressed by id;
- ``pyfunc``: the scorable model bundle (spec + safetensors + encoder, no pickled module) and loading it;
- ``registry``: versions, tags and the ``challenger`` / ``champion`` aliases.
"""
