"""Pruning: unit types, importance criteria, the plan (allocation), slicing, compensation and schedules.

Data flow (stages score and prune): ``criteria`` score each ``units`` type -> ``plan`` chooses what stays ->
``slicing`` removes the rest (``compensation`` folds what it can into biases); a ``schedules`` entry decides
whether that happens once or in rounds with LoRA training between them.
"""
