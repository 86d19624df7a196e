"""onnxruntime engine: an exported ONNX decoder (with KV cache) on the CPU or CUDA execution provider."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from basel_edge.errors import UserError
from basel_edge.families import family_of

from . import Generation, Runtime, Unavailable, peak_rss_bytes, register

ONNX_FILE = "model.onnx"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _model_file(path: Path) -> Path:
    path = Path(path)
    file = path / ONNX_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path} has no {ONNX_FILE}; export one with `basel-edge export --target onnx`")
    return file


@register
class OrtRuntime(Runtime):
    engine = "onnxruntime"

    def __init__(self, file: Path, session, device: str, threads: int, layers: int, kv_heads: int, head_dim: int) -> None:
        self.file, self.session, self.device, self.threads = file, session, device, threads
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.output_names = [o.name for o in session.get_outputs()]

    @classmethod
    def open(cls, artifact_path, device="cpu", threads=None):
        import onnxruntime as ort

        if device not in PROVIDERS:
            raise Unavailable(f"onnxruntime has no '{device}' profile here (the mobile profile is executorch's)")
        provider = PROVIDERS[device]
        if provider not in ort.get_available_providers():
            raise Unavailable(f"onnxruntime {ort.__version__} has no {provider} on this machine")
        file = _model_file(Path(artifact_path))
        config_file = file.parent / "config.json"
        if not config_file.is_file():
            raise UserError(f"{file.parent} has no config.json next to {ONNX_FILE}")
        config = json.loads(config_file.read_text())
        head_dim = family_of(config).head_dim(config)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(file), sess_options=options, providers=[provider])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/InvalidGraph types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{file} is not a loadable ONNX model ({first[:300]})") from None
        return cls(file, session, device, threads or 0, config["num_hidden_layers"], config["num_key_value_heads"], head_dim)

    def _empty_past(self) -> dict[str, np.ndarray]:
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return {f"past_key_values.{i}.{kv}": empty for i in range(self.layers) for kv in ("key", "value")}

    def _run(self, ids: list[int], past: dict[str, np.ndarray], past_len: int):
        feed = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, past_len + len(ids)), dtype=np.int64),
            "position_ids": np.arange(past_len, past_len + len(ids), dtype=np.int64)[None],
            **past,
        }
        outputs = self.session.run(None, feed)
        present = {
            name.replace("present.", "past_key_values."): value
            for name, value in zip(self.output_names[1:], outputs[1:])
        }
        return outputs[0][0], present

    def logits(self, token_ids):
        logits, _ = self._run(list(token_ids), self._empty_past(), 0)
        return logits

    def generate(self, prompt_ids, max_new_tokens):
        start = time.perf_counter()
        logits, past = self._run(list(prompt_ids), self._empty_past(), 0)
        tokens = [int(logits[-1].argmax())]
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        while len(tokens) < max_new_tokens:
            logits, past = self._run([tokens[-1]], past, len(prompt_ids) + len(tokens) - 1)
            tokens.append(int(logits[-1].argmax()))
        return Generation(tokens, prefill, time.perf_counter() - start, peak_rss_bytes())

    def info(self):
        import onnxruntime as ort

        size = sum(f.stat().st_size for f in self.file.parent.iterdir() if f.name.startswith(ONNX_FILE))
        meta = self.session.get_modelmeta().custom_metadata_map
        return {
            "engine": "onnxruntime",
            "version": ort.__version__,
            "device": self.device,
            "provider": PROVIDERS[self.device],
            "threads": self.threads,
            "bytes": size,
            "weights": json.loads(meta.get("basel.weights", "{}")),
        }
