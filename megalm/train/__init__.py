"""Training: the only package that talks to DeepSpeed."""

from megalm.train.trainer import CollectiveError, Trainer, TrainResult, pretrain

__all__ = ["CollectiveError", "TrainResult", "Trainer", "pretrain"]
