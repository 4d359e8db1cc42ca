"""edge_sdk — what a device app embeds to keep a deployed model improving from its users' labels."""

__version__ = "0.1.0"
