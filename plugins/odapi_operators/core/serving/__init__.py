"""The TF Serving model directory: versions, labels, models.config, client, registry."""
