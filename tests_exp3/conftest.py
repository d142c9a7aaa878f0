"""exp3 fixtures: one prompt per scale, reused by the token-accuracy and resume-latency tests."""

from __future__ import annotations

import pytest
import torch

CHAT_PROMPT = "In two sentences, explain why the sky is blue during the day and red at sunset."
PROMPT_TOKENS_13B = 2048


def chat_ids(tokenizer, text: str = CHAT_PROMPT) -> torch.Tensor:
    """A real chat prompt through the tokenizer's chat template, (1, seq) token ids."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return tokenizer(rendered, return_tensors="pt").input_ids


@pytest.fixture(scope="session")
def smollm2_chat_ids(smollm2_cpu) -> torch.Tensor:
    return chat_ids(smollm2_cpu[1])


@pytest.fixture(scope="session")
def prompt_2048_ids(cuda_device) -> torch.Tensor:
    """2048 seeded random token ids (1, 2048) on the GPU (Llama-2 vocabulary)."""
    g = torch.Generator().manual_seed(2048)
    return torch.randint(3, 32000, (1, PROMPT_TOKENS_13B), generator=g).to(cuda_device)
