"""distinfer: distributed inference of deep-learning models over many workers.

    import distinfer
    report = distinfer.run(model="minilm", input="corpus.txt", output="out/", workers=2)
    distinfer.serve(model="minilm", replicas=2, port=8000)   # until SIGTERM / Ctrl-C
"""

from .api import bench, run, serve
from .config import RunConfig
from .errors import (
    ConfigError,
    DistinferError,
    InputError,
    JobFailedError,
    ModelError,
    ModelInputError,
    OutputError,
)
from .report import JobReport
from .serving.config import ServeConfig

__all__ = [
    "ConfigError",
    "DistinferError",
    "InputError",
    "JobFailedError",
    "JobReport",
    "ModelError",
    "ModelInputError",
    "OutputError",
    "RunConfig",
    "ServeConfig",
    "bench",
    "run",
    "serve",
]

__version__ = "0.1.0"
