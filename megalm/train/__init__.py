"""Training: the only package that talks to DeepSpeed."""

from megalm.train.trainer import Trainer, TrainResult, pretrain

__all__ = ["TrainResult", "Trainer", "pretrain"]
