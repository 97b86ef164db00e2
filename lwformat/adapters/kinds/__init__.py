"""Adapter kinds, one module each, all behind the `Adapter` contract."""

from .base import Adapter, SlotSettings
from .bias import BiasDelta
from .dora import DoRA
from .ia3 import IA3
from .lora import LoRA
from .neuron import NeuronDelta

KINDS: dict[str, type[Adapter]] = {k.kind: k for k in (LoRA, DoRA, IA3, NeuronDelta, BiasDelta)}

__all__ = ["Adapter", "BiasDelta", "DoRA", "IA3", "KINDS", "LoRA", "NeuronDelta", "SlotSettings"]
