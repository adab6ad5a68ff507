"""Sub-command groups of the ``conveyor`` CLI; each module defines ``register(subparsers)``."""
