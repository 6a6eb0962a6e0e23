"""Runtime: the entry point, the supervisor of worker processes, their slots, and logging."""
