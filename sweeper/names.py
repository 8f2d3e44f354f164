"""Names sweeper stores in Optuna (trial and study attrs) and MLflow (tags, metrics): other
programs and older studies read them, so they never change."""

from __future__ import annotations

# Optuna trial user attrs
RUN_ID_ATTR = "mlflow_run_id"  # the cell run in MLflow that the trial trained
VARIANT_ATTR = "variant"
DATASET_ATTR = "dataset"

# MLflow metrics a cell run logs once per epoch (step: the epoch)
EPOCH_METRICS = ("train_loss", "test_loss", "top1_error", "top5_error", "lr", "epoch_seconds", "images_per_s")
