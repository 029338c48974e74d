"""The thin trainer: distil a transformers causal-LM student from a teacher with the fused losses.

    from distill_ops.trainer import TrainConfig, train
    result = train(TrainConfig(student="path/student", teacher="path/teacher",
                               train_data="corpus.txt", max_steps=1000))

``distill-ops train`` is the command-line form; ``distill-ops demo`` the self-contained demo.
"""

from .config import ConfigError, TrainConfig
from .data import shift_labels, train_bpe_tokenizer
from .eval import evaluate
from .interrupt import TrainingInterrupted
from .loop import ModelLoadError, TrainResult, load_model, train

__all__ = ["TrainConfig", "ConfigError", "ModelLoadError", "TrainResult", "TrainingInterrupted", "train", "evaluate",
           "load_model", "shift_labels", "train_bpe_tokenizer"]
