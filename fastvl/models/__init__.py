"""fastvl's models, built from :mod:`fastvl.nn`: ViLBERT, VL-BERT and ALBEF."""

from fastvl.models.albef import ALBEF, ALBEFClassifier, ALBEFConfig
from fastvl.models.vilbert import (
                                   ViLBERTConfig,
                                   ViLBERTForPretraining,
                                   ViLBERTForTasks,
                                   ViLBERTModel,
                                   ViLBERTPretrainingOutput,
                                   ViLBERTTaskOutput,
)
from fastvl.models.vlbert import (
                                   VLBERT,
                                   VLBERTConfig,
                                   VLBERTForPretraining,
                                   VLBERTForRefCOCO,
                                   VLBERTForVCR,
                                   VLBERTForVQA,
)

__all__ = ["ALBEF", "ALBEFClassifier", "ALBEFConfig", "VLBERT", "VLBERTConfig", "VLBERTForPretraining",
           "VLBERTForRefCOCO", "VLBERTForVCR", "VLBERTForVQA", "ViLBERTConfig", "ViLBERTForPretraining",
           "ViLBERTForTasks", "ViLBERTModel", "ViLBERTPretrainingOutput", "ViLBERTTaskOutput"]
