"""The structured-pruning baselines' maths, no file I/O: ViT-Slim (``slim``), OFB (``ofb``) and the
pruned-block structure both slice a timm ViT into (``structure``)."""
