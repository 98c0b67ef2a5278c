"""Whole-slide prediction (``magnet predict``): a registry model and a slide to AnnData and PNG gene maps.

``model`` loads the registered pyfunc and what it needs to rebuild samples; ``grid`` lays bins over
detected tissue for image-only input; ``slide`` streams tiles through the sharding stage's own
functions and the model; ``anndata_out`` and ``maps`` write the results.
"""
