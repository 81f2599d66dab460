"""``python -m veil``: the ``veil`` command (how the network runtime starts devices)."""

from veil.cli import app

__all__: list[str] = []

if __name__ == "__main__":
    app()
