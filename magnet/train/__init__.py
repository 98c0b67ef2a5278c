"""Training: experiment config, the DeepSpeed loop, checkpoints, MLflow tracking and the registry model."""
