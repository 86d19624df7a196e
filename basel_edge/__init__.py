"""basel-edge: compress an LLM for one target task and ship it to edge runtimes.

Nothing in basel-edge may reach a model hub, so the offline switches of huggingface_hub, transformers and
datasets are set before any of them is imported.
"""

import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
