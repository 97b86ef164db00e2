"""Adapters: the injection contract (slots, the host layer), the kinds, and customizing."""

from .config import LightConfig
from .host import AdapterHost
from .kinds import KINDS, Adapter, BiasDelta, DoRA, IA3, LoRA, NeuronDelta, SlotSettings
from .layers import Geometry, geometry
from .plan import Plan, SlotPlan

__all__ = [
    "Adapter",
    "AdapterHost",
    "BiasDelta",
    "DoRA",
    "Geometry",
    "IA3",
    "KINDS",
    "LightConfig",
    "LoRA",
    "NeuronDelta",
    "Plan",
    "SlotPlan",
    "SlotSettings",
    "geometry",
]
