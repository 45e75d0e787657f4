"""The stage commands, one module each: ``flora <stage>`` or ``python -m flora_steps.stages.<stage>``.

Each reads its params, calls the library (``core``, ``pruning``, ``report``) through the
shared run-time (``runtime``), and writes its artifacts under its results folder.
"""
