"""Sub-commands of the ``veil`` CLI, one typer app per area (privacy, secagg, ...).

Each module here only parses arguments and prints; the work is done by the library.
"""
