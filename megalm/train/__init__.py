"""Training: the only package that talks to DeepSpeed."""

from megalm.train.trainer import Trainer, TrainResult, check_config, pretrain

__all__ = ["TrainResult", "Trainer", "check_config", "pretrain"]
