"""distinfer: distributed inference of deep-learning models over many workers.

    import distinfer
    report = distinfer.run(model="minilm", input="corpus.txt", output="out/", workers=2)
"""

from .api import bench, run
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
    "bench",
    "run",
]

__version__ = "0.1.0"
