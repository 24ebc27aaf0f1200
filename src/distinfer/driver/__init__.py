"""Driver side of the wire: the batch job loop (`job.py`) and the replica layout chosen
before any worker starts (`layout.py`)."""
