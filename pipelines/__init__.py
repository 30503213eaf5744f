"""The pipelines medvision ships: data, not code.

Each sub-folder ``<name>/`` holds ``pipeline.yaml``, the weights (safetensors), calibration,
out-of-distribution statistics and ``MODEL_CARD.md``. Installed as the package
``medvision_pipelines`` and found through the ``medvision.pipelines`` entry point (see
:mod:`medvision.catalog`).
"""
