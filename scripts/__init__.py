"""cells.scripts: the `cells` command-line app and runnable tools."""
