"""sweeper: sweep GoogLeNet variants across datasets with Optuna workers, tracked in MLflow."""

__version__ = "0.1.0"
