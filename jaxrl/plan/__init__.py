"""Memory planner: per-device bytes of one RL step, whether it fits, and which knob to turn.

``plan(model_cfg, settings, hardware) -> Plan`` (``advice.py``) estimates every component of
one step (``memory.py``, which also documents the memory model) on a hardware slice or known
model (``hardware.py``) and, when it does not fit, names the knobs to turn. ``main(argv)``
(``command.py``) is the ``jaxrl plan`` command.
"""

from jaxrl.plan.advice import plan
from jaxrl.plan.command import main, settings_from_config
from jaxrl.plan.hardware import GIB, HARDWARE_KINDS, KNOWN_MODELS, Hardware, parse_hardware, resolve_model
from jaxrl.plan.memory import Plan, PlanSettings, activation_bytes, estimate

__all__ = [
    "GIB", "HARDWARE_KINDS", "KNOWN_MODELS", "Hardware", "Plan", "PlanSettings", "activation_bytes",
    "estimate", "main", "parse_hardware", "plan", "resolve_model", "settings_from_config",
]
