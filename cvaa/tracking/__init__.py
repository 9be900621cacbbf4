"""MLflow at the edge: runs (:mod:`~cvaa.tracking.runs`) and the model registry
(:mod:`~cvaa.tracking.registry`).

Only the driver and rank 0 call into this package; the core (data, models, losses,
metrics, the GAN step) never imports it.
"""

from cvaa.tracking.registry import (LoadedModel, ModelLookupError, attach_calibration,
                                    load_generator, load_model, log_calibration_run,
                                    log_generator, model_version_tags)
from cvaa.tracking.runs import (CREDENTIAL_VARIABLES, EXPERIMENT, RunKilled, RunLogger,
                                TrackingAuthError, TrackingUnavailableError, auth_refusal,
                                check_server, check_tracking_uri, default_tracking_uri,
                                find_run, open_run, setup, source_tags, system_metrics)

__all__ = ["CREDENTIAL_VARIABLES", "EXPERIMENT", "LoadedModel", "ModelLookupError",
           "RunKilled", "RunLogger", "TrackingAuthError", "TrackingUnavailableError",
           "attach_calibration", "auth_refusal", "check_server", "check_tracking_uri",
           "default_tracking_uri", "find_run", "load_generator", "load_model",
           "log_calibration_run", "log_generator", "model_version_tags", "open_run", "setup",
           "source_tags", "system_metrics"]
