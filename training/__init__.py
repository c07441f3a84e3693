"""Training place-recognition models: hard-negative mining from a descriptor cache, the training
loop (triplet, soft-label and RSW objectives), checkpoints with exact resume, the run log and the
`netvlad train` command. Imports `netvlad`; the library never imports this package."""

from training.loop import TrainConfig, Trainer, read_checkpoint
from training.mining import HardNegativeMiner, MinedTuple
from training.runlog import RunLog

__all__ = ["HardNegativeMiner", "MinedTuple", "RunLog", "TrainConfig", "Trainer", "read_checkpoint"]
