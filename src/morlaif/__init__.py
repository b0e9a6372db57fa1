"""morlaif: multi-objective reinforcement learning from AI feedback.

Light on import: heavy libraries (torch, transformers, trl) load inside the stage modules.
"""

__version__ = "0.1.0"

from morlaif.config import Config, load_config  # noqa: E402
from morlaif.errors import InputError  # noqa: E402

__all__ = ["Config", "InputError", "load_config", "__version__"]
