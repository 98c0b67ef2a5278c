"""Synthetic Visium HD slides in the Space Ranger layout (``magnet synth``); see cohort.py for the files."""

from magnet.synth.cohort import generate_cohort
from magnet.synth.config import ExpressionConfig, SynthConfig, TissueConfig

__all__ = ["ExpressionConfig", "SynthConfig", "TissueConfig", "generate_cohort"]
