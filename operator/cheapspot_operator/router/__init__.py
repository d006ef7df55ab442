"""An inference pool's router: the process (server) and its decisions (routing, pure)."""
