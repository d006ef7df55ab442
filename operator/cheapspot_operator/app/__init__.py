"""The operator's entry point, the registry that wires every kind, and the cost view (CLI)."""
