"""Training place-recognition models: hard-negative mining from a descriptor cache, the training
loop (triplet, soft-label and RSW objectives), the run state for exact resume, the run log and the
`netvlad train` command. Imports `netvlad`; the library never imports this package."""

from training.config import TrainConfig
from training.loop import Trainer
from training.mining import HardNegativeMiner, MinedTuple
from training.run_state import read_run_state
from training.runlog import RunLog

__all__ = ["HardNegativeMiner", "MinedTuple", "RunLog", "TrainConfig", "Trainer", "read_run_state"]
