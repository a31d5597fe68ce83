"""Classification application (the paper's appendix C.8): DTD and MNIST datasets."""

from .datasets import DTD, MNIST, ClassificationDataset, preprocess_dtd

__all__ = ["DTD", "MNIST", "ClassificationDataset", "preprocess_dtd"]
