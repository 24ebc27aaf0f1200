"""`distinfer simulate`: the real scheduler and the real batcher, driven in simulated time.

`simulate_job` runs a batch job's `Scheduler` over a simulated cluster (kinds, speed spread,
stragglers, deaths, scripted kills and stops); `simulate_serving` runs a server's
`RequestQueue` (admission, batch formation) against simulated replicas. Both are pure
functions of their inputs and seed: no process, no sleep, no clock.
"""

from distinfer.simulation.batch import simulate_job
from distinfer.simulation.results import JobResult, Timeline
from distinfer.simulation.spec import ClusterSpec, Fault, JobSpec, WorkerKind

__all__ = ["ClusterSpec", "Fault", "JobResult", "JobSpec", "Timeline", "WorkerKind", "simulate_job"]
