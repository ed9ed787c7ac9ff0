"""Where do runs and models go? MLflow, behind the ``emm.tracker.Tracker`` protocol.

This package is the only place that imports mlflow (an import contract in CI keeps it so):
- ``store``: the tracking/registry URI, one experiment per dataset, which errors are transient;
- ``runs``: ``MlflowTracker`` (the Tracker the stages are handed) and runs addressed by id;
- ``pyfunc``: the scorable model bundle (spec + safetensors + encoder) logged from code (``scorer_model.py``),
  nothing pickled;
- ``loading``: what ``emm predict`` loads a model with: the bundle alone, no code from the model folder;
- ``registry``: versions, tags and the ``challenger`` / ``champion`` aliases.
"""
