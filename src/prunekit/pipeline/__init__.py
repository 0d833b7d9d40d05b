"""Pipeline plumbing: typed params and their validation, the stage runtime (Prefect), atomic files, stage I/O.

The stages (``stages/*.py``) read params.yaml and take paths from dvc.yaml; ``prunekit.data``, ``pruning``,
``training``, ``quant`` and ``evaluation`` receive typed settings (the sections of :mod:`prunekit.pipeline.params`)
and open no params file, fixed path or command line of their own.
"""
