"""The models-from-code file of every EMM pyfunc (MLflow copies it into the logged model as its code).

Why a file and not a pickled object: loading a pickle runs whatever code it names; this file is plain,
readable Python that only builds ``EMMScorer``, and ``EMMScorer`` reads JSON, Parquet and safetensors.
MLflow runs this file when ``mlflow.pyfunc.load_model`` loads the model (and once when logging it);
``emm predict`` never runs it, and reads the bundle itself (``emm.tracking.loading``).
"""

from mlflow.models import set_model

from emm.tracking.pyfunc import EMMScorer

set_model(EMMScorer())
