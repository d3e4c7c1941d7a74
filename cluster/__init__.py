"""Ray orchestration of the quantizer: planning, stage actors, the driver and the CLI."""
