"""Ray Tune sweeps over hyperparameters and bin resolutions: every trial calls ``magnet.train.loop.train``."""
