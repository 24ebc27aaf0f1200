"""Worker-side runtime: the replica, its messages, and the driver loop."""
