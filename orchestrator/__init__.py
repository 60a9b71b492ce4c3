"""rbdfleet control plane: provisioning, deployment, coordinator, client and CLI."""
