"""`yitrt bench`: load generation, metrics, report and plots for a served deployment."""
