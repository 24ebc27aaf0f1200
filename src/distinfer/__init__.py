"""distinfer: distributed inference of deep-learning models over many workers.

    import distinfer
    report = distinfer.run(model="minilm", input="corpus.txt", output="out/", workers=2)
    distinfer.serve(model="minilm", replicas=2, port=8000)   # until SIGTERM / Ctrl-C
"""

import logging
from typing import TYPE_CHECKING

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
    WorkersNotReadyError,
)
from .report import JobReport

if TYPE_CHECKING:
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
    "WorkersNotReadyError",
    "bench",
    "run",
    "serve",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # ServeConfig is imported on first use: the batch side never loads the serving package.
    if name == "ServeConfig":
        from .serving.config import ServeConfig

        return ServeConfig
    raise AttributeError(f"module 'distinfer' has no attribute {name!r}")

# Library logging: silent unless the application (or the CLI) configures it.
logging.getLogger("distinfer").addHandler(logging.NullHandler())
