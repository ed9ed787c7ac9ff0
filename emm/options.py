"""The base of every settings section: strict pydantic models.

Why strict: an unknown key is an error (``extra="forbid"``), so a typo in params.yaml can never silently
fall back to a default. Each library package declares the options it takes (``emm.data.options``,
``emm.train.options``, ``emm.fusion.options``); ``emm.pipeline.params`` assembles them into params.yaml.
"""

from pydantic import BaseModel, ConfigDict


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
