"""Tokenizer builder of the Trinity TrainSpec: validates the job config, then builds the HF tokenizer.

It is the first TrainSpec builder TorchTitan calls, so the config checks run here, before the
dataloader and the model are built.
"""

from __future__ import annotations

from torchtitan.components.tokenizer import BaseTokenizer, build_hf_tokenizer
from torchtitan.config import JobConfig

from trinity_titan.model import trinity_flavors
from trinity_titan.validation import (
    check_data_sources,
    check_document_masking,
    check_flavor,
    check_paths,
    check_vocab,
)


def build_trinity_tokenizer(job_config: JobConfig) -> BaseTokenizer:
    model_args = check_flavor(job_config, trinity_flavors)
    check_paths(job_config)
    check_data_sources(job_config)
    tokenizer = build_hf_tokenizer(job_config)
    check_vocab(tokenizer, model_args, job_config)
    check_document_masking(job_config, model_args, tokenizer)
    return tokenizer
