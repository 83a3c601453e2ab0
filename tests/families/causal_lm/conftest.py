"""Tiny stand-ins for the causal_lm tests: a byte-level BPE tokenizer trained in-process on a few sentences
(with ChatML-style special tokens and a chat template) and a random 4-layer Llama (hidden 64, 4 query heads in
2 KV groups), so every test runs in seconds without the real SmolLM2."""

from __future__ import annotations

import pytest
import torch

from slimray.families.causal_lm.data import Document

SENTENCES = [
    "The cat sat on the mat and looked at the garden.",
    "Rivers flow from the mountains to the sea through green valleys.",
    "A computer program is a sequence of instructions for a machine.",
    "The history of music spans many centuries and many cultures.",
    "Paris is the capital of France and a centre of art and science.",
    "Bees collect nectar from flowers and turn it into honey.",
] * 4
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(tokenizer, *, num_layers: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    return make_model(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_docs():
    return [Document(group=f"doc{i}", text=s) for i, s in enumerate(SENTENCES)]


@pytest.fixture(scope="session")
def tiny_windows(tiny_tokenizer, tiny_docs):
    from slimray.families.causal_lm.data import pack_windows

    return pack_windows(tiny_docs, tiny_tokenizer, window_len=32)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny_tokenizer):
    """A saved tiny model folder (safetensors + config + tokenizer), as a user's teacher would be."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model(tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path
