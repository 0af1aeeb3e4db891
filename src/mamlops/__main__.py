"""``python -m mamlops ...`` is the same as the ``mamlops`` command."""

from .cli import app

app(prog_name="mamlops")
