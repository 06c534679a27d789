"""Models-from-code entry point of the registered model.

The register stage logs this file as ``python_model``; MLflow stores it with the model and runs it at
load time, so the model is defined by code, not by a pickled object (MLflow 3's recommended way, and no
cloudpickle across library versions). It only names the model class; all logic is in
:mod:`visiontune.pipeline.pyfunc`. Nothing else should import this module.
"""

from mlflow.models import set_model

from visiontune.pipeline.pyfunc import VisionLoraModel

set_model(VisionLoraModel())
