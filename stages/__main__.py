"""``python -m stages <stage>``: the entry point ``accelerate launch -m stages <stage>`` uses."""

from stages.cli import app

app()
