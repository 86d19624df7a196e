"""basel-edge: compress an LLM for one target task and ship it to edge runtimes.

Nothing in basel-edge may reach a model hub, so the offline switches of huggingface_hub, transformers and
datasets are set before any of them is imported. Two harmless messages that importing torchao / ExecuTorch
writes on every run (CUDA-only torchao kernels absent from the CPU wheel; torch's deprecation of
`register_constant` for enums, which torchao calls) are filtered out, so a user's terminal shows basel-edge's
own lines; every other warning of those libraries still shows.
"""

import logging
import os
import re

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

_IMPORT_NOISE = {
    "torchao": re.compile(r"Failed to load .*torchao/_C_(mxfp8|cutlass_90a)"),
    "torch.utils._pytree": re.compile(r"is an Enum subclass and is now natively supported by torch\.compile"),
}
for _name, _pattern in _IMPORT_NOISE.items():
    logging.getLogger(_name).addFilter(lambda record, p=_pattern: not p.search(record.getMessage()))

__version__ = "0.1.0"
