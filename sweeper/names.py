"""Names sweeper stores in Optuna (trial and study attrs) and MLflow (tags, metrics, artifacts):
other programs and older studies read them, so they never change."""

from __future__ import annotations

# Optuna study user attrs
SPEC_ATTR = "sweeper.spec"
SPEC_HASH_ATTR = "sweeper.spec_hash"
LIFECYCLE_ATTR = "sweeper.lifecycle"  # {"state", "reason", "at"}: what every worker obeys
FAILED_CELLS_ATTR = "sweeper.failed_cells"  # cells failed for good, already announced
OUTCOME_ATTR = "sweeper.outcome"  # running / finished / failed, as last mirrored to MLflow

# Optuna trial user attrs (RECIPE_DIGEST_ATTR is a study user attr too: the latest launch's recipe)
KEY_ATTR = "sweeper.key"
RECIPE_ATTR = "sweeper.recipe"  # the resolved recipe the trial was enqueued with: it trains with exactly this
RECIPE_DIGEST_ATTR = "sweeper.recipe_digest"  # with the key, the trial's identity
IDENTITY_ATTRS = (KEY_ATTR, RECIPE_ATTR, RECIPE_DIGEST_ATTR)
RUN_ID_ATTR = "mlflow_run_id"  # the cell run in MLflow that the trial trained
VARIANT_ATTR = "variant"
DATASET_ATTR = "dataset"
# The test top-1 error of a trial's latest epoch, where the trial reports another metric to Optuna
# (validation); otherwise the intermediate values are the top-1 errors.
TOP1_ERROR_ATTR = "sweeper.top1_error"
HOST_ATTR = "sweeper.host"
EPOCHS_ATTR = "sweeper.epochs"

# Optuna trial system attrs (of a failed trial)
FAIL_REASON_ATTR = "sweeper.fail_reason"  # the cause in words, for people
FAIL_CAUSE_ATTR = "sweeper.fail_cause"  # the cause as a code of sweeper.causes.CAUSES (absent on older trials)
NO_RETRY_ATTR = "sweeper.no_retry"  # a trial failed for a reason retrying cannot fix
# Written by Optuna's RetryHeartbeatStaleTrialCallback (and by sweeper's own retries alike)
FAILED_TRIAL_ATTR = "failed_trial"
RETRY_HISTORY_ATTR = "retry_history"  # the numbers of the attempts this trial retries

# MLflow metrics a cell run logs once per epoch (step: the epoch)
EPOCH_METRICS = ("train_loss", "test_loss", "top1_error", "top5_error", "lr", "epoch_seconds", "images_per_s")
VAL_EPOCH_METRICS = ("val_loss", "val_top1_error", "val_top5_error")  # when the recipe holds out a slice

# MLflow artifact folder of a cell run that holds its latest checkpoint (last.pt), for resuming
CHECKPOINT_ARTIFACT = "checkpoint"
