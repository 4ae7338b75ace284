"""Shipped recipes, installed with jaxrl: ``jaxrl train --config NAME`` finds ``configs/NAME.py``
from any directory, and a recipe can import and extend another (``from configs.X import ...``)."""
