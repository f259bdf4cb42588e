"""Per-class Activation Clustering (Chen et al., 2018) on a candidate's training data."""
