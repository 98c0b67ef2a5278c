"""The registry model (an MLflow pyfunc carrying weights, genes and config) and MLflow tracking: used by
training, sweeps, prediction and evaluation, importing none of them."""
