"""What the stage commands share at run time: the run's context, paths, identity and logging
(``context``), the one training loop (``training``), data, transforms and image checks, models,
artifacts, processes under torchrun (``distributed``), progress bars and the C library's allocator."""
