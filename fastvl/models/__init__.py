"""fastvl's models, built from :mod:`fastvl.nn`."""

from fastvl.models.vilbert import (ViLBERTConfig, ViLBERTForPretraining, ViLBERTForTasks, ViLBERTModel,
                                   ViLBERTPretrainingOutput, ViLBERTTaskOutput)

__all__ = ["ViLBERTConfig", "ViLBERTForPretraining", "ViLBERTForTasks", "ViLBERTModel", "ViLBERTPretrainingOutput",
           "ViLBERTTaskOutput"]
