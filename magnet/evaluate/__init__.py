"""Evaluation on held-out slides (``magnet evaluate``): the paper's table for several models at once.

``config`` holds the typed options; ``truth`` the measured and (synthetic slides) expected expression at
bin and spot level, normalised as the model's training targets; ``table`` runs each model over each
slide with :func:`magnet.predict.slide.predict_slide` and accumulates
:class:`magnet.metrics.ExpressionMetrics`; ``paired`` groups genes, pools replicates and compares two
models (per-gene PCC difference, bootstrap interval, Wilcoxon test, scatter plot); ``report`` writes
Markdown and CSV and logs to MLflow.
"""
