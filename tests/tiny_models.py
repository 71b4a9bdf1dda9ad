"""Tiny causal LMs built from transformers configs with random weights (no downloads), for fast tests."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

from lowrank_ops.assets import tiny_llama


def tiny_llama_gqa():
    """Llama with GQA (k/v 24 x 48 next to q 48 x 48), vocab 128."""
    return tiny_llama(vocab_size=128, hidden_size=48, intermediate_size=80, max_position_embeddings=64)


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def tiny_opt():
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=32)  # fmt: skip
    return OPTForCausalLM(config).eval()


ENGLISH_WORDS = ("the of and in to a is was for on as by with he that at from his it an were are which this be or "
                 "first also had has not their its but one new after city they who been two she her have all other "
                 ", . ( ) ' \" ; : - s 1 2 3 4 5 6 7 8 9 0")  # fmt: skip


def word_tokenizer(words: str = ENGLISH_WORDS):
    """A real (fast) Hugging Face tokenizer built in memory (no download): <unk>, <s>, </s>, then `words` (ids < 128
    for the default list, so it fits the tiny models' vocabularies)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(words.split()))}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
