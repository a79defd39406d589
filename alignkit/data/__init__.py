"""Datasets (LLaMA-Factory registry and row formats), chat templates, encoding, collators."""

from alignkit.data.chat_format import ChatFormat
from alignkit.data.collators import PairCollator, SFTCollator, pad_left
from alignkit.data.encode import (
    IGNORE_INDEX,
    encode_pair,
    encode_prompt,
    encode_supervised,
    encode_supervised_examples,
)
from alignkit.data.loader import DataError, Example, load_examples, split_train_val
from alignkit.data.templates import TEMPLATES, AutoTemplate, Template, get_template

__all__ = [
    "IGNORE_INDEX",
    "TEMPLATES",
    "AutoTemplate",
    "ChatFormat",
    "DataError",
    "Example",
    "PairCollator",
    "SFTCollator",
    "Template",
    "encode_pair",
    "encode_prompt",
    "encode_supervised",
    "encode_supervised_examples",
    "get_template",
    "load_examples",
    "pad_left",
    "split_train_val",
]
