"""The report's helpers, no file I/O: tables (``tables``), figures (``figures``), paired bootstrap
statistics (``stats``) and trade-off maths (``tradeoff``)."""
