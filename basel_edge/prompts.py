"""How a code request is put to a model: the chat framing that HumanEval evaluation uses and that the
`python-functions` task trains on, defined once so the two cannot drift apart (ARCHITECTURE.md section 1).

A tokenizer with a chat template gets the request as a user turn and the answer started for it with a Python
code block holding the function's head, so the model continues the body and closes the block; a tokenizer
without one gets the bare function head and continues it as plain text.
"""

from __future__ import annotations

INSTRUCTION = "Complete the following Python function.\n```python\n{prompt}```"
FENCE = "```"
ANSWER_START = FENCE + "python\n"


def uses_chat(tokenizer) -> bool:
    """Whether requests go to this tokenizer's model as chat turns."""
    return bool(getattr(tokenizer, "chat_template", None))


def request_text(prompt: str, tokenizer) -> str:
    """What the model reads before it writes the body of the function whose head is `prompt`."""
    if not uses_chat(tokenizer):
        return prompt
    messages = [{"role": "user", "content": INSTRUCTION.format(prompt=prompt)}]
    chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return chat + ANSWER_START + prompt


def answer_text(body: str, tokenizer) -> str:
    """The trained answer after `request_text`: the body, and in chat the closing fence. The tokenizer's EOS
    follows it, which ends the turn where EOS is the end-of-turn token (Qwen2.5 and SmolLM2 instruct)."""
    if not uses_chat(tokenizer):
        return body
    return body + ("" if body.endswith("\n") else "\n") + FENCE
