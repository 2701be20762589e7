"""The command line: one module per sub-command, the only code that knows argparse. Each module's
``register(sub)`` adds its parser and sets ``run`` (the function to call) and ``flags`` (library
parameter names this command spells otherwise); ``turbolm.cli`` dispatches."""

from . import bench, demo, draft, eval, generate, info, prune, serve

#: in the order ``turbolm --help`` lists them
MODULES = (generate, serve, info, demo, draft, bench, prune, eval)
