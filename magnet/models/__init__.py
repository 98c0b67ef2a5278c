"""Models: the timm encoder wrapper, MagNet, its ablations and the baselines (built by name)."""
