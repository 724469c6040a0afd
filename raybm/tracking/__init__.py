"""Records elsewhere than the results folder: MLflow runs and sweeps (``runs``) and the
Model Registry (``registry``), both optional (``tracking.mlflow_uri``).

TensorBoard's event files live with training (``raybm.train.tensorboard``): they are part
of the results folder, not a service to reach.
"""

from raybm.tracking.runs import check_tracking, flat_params, log_run, mlflow_client, run_metrics

__all__ = ["check_tracking", "flat_params", "log_run", "mlflow_client", "run_metrics"]
