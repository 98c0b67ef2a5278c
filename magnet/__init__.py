"""MagNet-HD: Visium HD gene expression from H&E with a multi-level attention graph network.

Importing this package is light: no torch-heavy stacks (deepspeed, ray, mlflow) load here.
"""

__version__ = "0.1.0"
