"""Worker side of the wire: the replica (one model copy: a process, or a group of stage or
rank processes), its group runners, the links between stages and the collectives between
ranks. Nothing here knows about jobs, block plans or the scheduler."""
