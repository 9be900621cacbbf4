"""Ray glue: the Ray Data preprocessing pipeline, and (later) the Ray Train loop."""
