"""The reference engine: the dense or factorized checkpoint in torch eager (cpu, cuda)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from basel_edge.checkpoint import load_model

from . import Generation, Runtime, Unavailable, cut_at_stop, peak_rss_bytes, register


@register
class TorchRuntime(Runtime):
    engine = "torch"

    def __init__(self, path: Path, model, device: str, threads: int) -> None:
        self.path, self.model, self.device, self.threads = path, model, device, threads

    @classmethod
    def open(cls, artifact_path, device="cpu", threads=None):
        if device == "mobile":
            raise Unavailable("torch eager has no mobile profile (use the executorch engine)")
        if device == "cuda" and not torch.cuda.is_available():
            raise Unavailable("torch sees no CUDA GPU on this machine")
        if threads:
            torch.set_num_threads(threads)
        model = load_model(artifact_path).to(device)
        return cls(Path(artifact_path), model, device, torch.get_num_threads())

    @torch.inference_mode()
    def logits(self, token_ids):
        ids = torch.tensor([token_ids], device=self.device)
        return self.model(input_ids=ids, use_cache=False).logits[0].float().cpu().numpy()

    @torch.inference_mode()
    def generate(self, prompt_ids, max_new_tokens):
        ids = torch.tensor([prompt_ids], device=self.device)
        start = time.perf_counter()
        out = self.model(input_ids=ids, use_cache=True)
        token = int(out.logits[0, -1].argmax())
        prefill = time.perf_counter() - start
        tokens, past = [token], out.cache
        start = time.perf_counter()
        while len(tokens) < max_new_tokens:
            out = self.model(input_ids=torch.tensor([[tokens[-1]]], device=self.device), cache=past, use_cache=True)
            past = out.cache
            tokens.append(int(out.logits[0, -1].argmax()))
        return Generation(tokens, prefill, time.perf_counter() - start, peak_rss_bytes())

    @torch.inference_mode()
    def generate_batch(self, prompts, max_new_tokens, stop=None, batch=8):
        """Batches of prompts of similar length, left-padded, through transformers' `generate` (greedy)."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        outputs: list[list[int]] = [[] for _ in prompts]
        pad = self.model.config.pad_token_id
        pad = pad if pad is not None else 0
        for start in range(0, len(order), batch):
            chunk = order[start:start + batch]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(chunk):
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1

            class Stop(StoppingCriteria):
                def __call__(self, input_ids, scores, **kwargs):
                    new = input_ids[:, width:].tolist()
                    return torch.tensor([bool(stop and stop(chunk[row], new[row])) for row in range(len(chunk))])

            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                      stopping_criteria=StoppingCriteriaList([Stop()]))
            for row, i in enumerate(chunk):
                outputs[i] = cut_at_stop(out[row, width:].tolist(), i, stop)
        return outputs

    def info(self):
        size = sum(f.stat().st_size for f in self.path.iterdir() if f.is_file()) if self.path.is_dir() else 0
        return {"engine": "torch", "version": torch.__version__, "device": self.device, "threads": self.threads, "bytes": size}
