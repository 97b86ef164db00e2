"""Adapters: the injection contract (slots, the host layer), the kinds, and customizing."""

from .config import LightConfig
from .host import AdapterHost
from .kinds import IA3, KINDS, Adapter, BiasDelta, DoRA, LoRA, NeuronDelta, SlotSettings
from .layers import Geometry, geometry
from .plan import Plan, SlotPlan

__all__ = [
    "IA3",
    "KINDS",
    "Adapter",
    "AdapterHost",
    "BiasDelta",
    "DoRA",
    "Geometry",
    "LightConfig",
    "LoRA",
    "NeuronDelta",
    "Plan",
    "SlotPlan",
    "SlotSettings",
    "geometry",
]
