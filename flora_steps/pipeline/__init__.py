"""The pipeline's description, read by both engines: methods, stages, their code; no torch.

``methods`` (one record per method), ``catalogue`` (every stage), ``schema`` (the
types, and how an input resolves), ``code`` (each stage's source files), ``commands``
(each stage's command-line arguments), ``dvc_yaml`` (``dvc.yaml`` generated from the catalogue).
"""
