"""Downstream fine-tuning and evaluation (``fastvl finetune`` / ``fastvl evaluate``): the engine, the task
registry (:mod:`fastvl.finetune.tasks`, one module per task) and the metrics."""
