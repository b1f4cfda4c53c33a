"""Ray Serve wiring and the HTTP API: app builder, deployments, ingress, error mapping."""
