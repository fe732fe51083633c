"""One module per ``ex4d`` sub-command; each defines ``register(subparsers)``.

Modules import heavy libraries (torch, diffusers, ...) inside their run functions so that
``ex4d --help`` and the service's start stay fast.
"""

COMMANDS = ("recon", "demo", "depth", "models", "generate", "serve", "run", "doctor", "store", "farm")

STORE_HELP = "job store folder (default: <user cache>/ex4d/store)"


def add_store_argument(p, help: str = STORE_HELP) -> None:
    """``--store DIR``: the job store every command that runs stages shares (``service.jobstore.open_store``)."""
    p.add_argument("--store", metavar="DIR", help=help)


def add_allow_argument(p, help: str) -> None:
    """``--allow DIR`` (repeatable): a folder that jobs may read inputs from (the store's sandbox)."""
    p.add_argument("--allow", metavar="DIR", action="append", default=None, help=help)
