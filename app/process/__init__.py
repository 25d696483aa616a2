"""The process shape: the supervisor, the engine host, the runtime a front end owns, CPU and
malloc settings."""
