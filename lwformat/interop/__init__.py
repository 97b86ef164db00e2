"""Interop with other adapter formats: PEFT adapter directories and kohya-style LoRA files.

Each imports into the adapters of one block of a world (customizing it), so a community
adapter becomes a light custom world that bundles, signs and ships like any other.
"""

from .kohya import import_kohya, prefix_rule
from .peft import export_peft, import_peft

__all__ = ["export_peft", "import_kohya", "import_peft", "prefix_rule"]
