"""One module per ``cplfast`` sub-command: ``add_arguments(parser)`` and ``run(args) -> int``."""
