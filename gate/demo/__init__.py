"""The embedded default: a family of digit classifiers trained on scikit-learn's load_digits."""
