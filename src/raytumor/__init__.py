"""raytumor: brain-MRI tumour classifiers trained, tuned and scored on Ray."""

__version__ = "0.1.0"
