"""One module per ``ex4d`` sub-command; each defines ``register(subparsers)``.

Modules import heavy libraries (torch, diffusers, ...) inside their run functions so that
``ex4d --help`` and the service's start stay fast.
"""

COMMANDS = ("recon", "demo", "depth", "models", "generate", "serve", "run", "doctor", "farm")
