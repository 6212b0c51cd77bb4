"""Pretraining under DeepSpeed: model family adapters (:mod:`~fastvl.train.families`), the papers'
optimizer and schedule presets (:mod:`~fastvl.train.presets`), the resumable loop
(:mod:`~fastvl.train.loop`) and the command line (:mod:`~fastvl.train.cli`)."""
