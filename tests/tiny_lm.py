"""Tiny random causal language models and tokenizers for the generation tests.

Nothing is downloaded: the model is built from a config, the tokenizer with the
``tokenizers`` library, and both are saved with ``save_pretrained`` so that
``AutoTokenizer.from_pretrained(dir)`` and ``AutoModelForCausalLM.from_pretrained(dir)`` load
them offline, exactly like a user's local model directory.

The output rows of the special tokens are zeroed: their logit is exactly 0, while a word's is
``h . w`` with random signs, so greedy decoding picks words (a 0 never beats the best of ~90
random logits) and never ends early on ``</s>``. Tests that need an end-of-sequence token
name one of the words as an extra ``eos_token_id`` in ``generation_config.json``
(:func:`with_eos`), the way chat models list several.

:class:`GatedLM` is the real adapter with a gate before each step, for tests that must
know which step a cancellation or a crash lands in.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ipcserve.adapters.hf import TransformersModel

SPECIAL = ("<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
WORDS = tuple(
    "the a an and or but if then so of to in on at by for with from up down over under "
    "cat dog bird fish mat hat sun moon star tree house road river sea sky rain snow wind "
    "is was are were be has had do did go went see saw say said make made take took sat sit "
    "good bad big small old new red blue green happy sad fast slow hot cold "
    "i you he she it we they me him her us them hello world story once upon time day night "
    "café naïve . , ! ?".split())
CONTEXT = 64  # max_position_embeddings: small, so a prompt can overflow it in a test
# A minimal chat format in the style of Zephyr/Phi: role markers, an end marker per turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def word_tokenizer() -> Any:
    """A word-level ``PreTrainedTokenizerFast``: WORDS and SPECIAL, a chat template, BOS
    prepended to plain text, words joined by spaces when decoded (WordPiece decoder, which
    also removes the space before punctuation)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    tok.add_special_tokens(list(SPECIAL))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", chat_template=CHAT_TEMPLATE, model_max_length=CONTEXT)


def byte_level_tokenizer() -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on a few lines: characters outside
    ASCII take several tokens each, as in GPT-2 and Llama 3 (for the incremental decoder)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat", "hello world", "once upon a time"] * 5,
                            trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


# A chat format that also lists the tools (as templates of tool-calling models do).
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|> tools: {{ tools | tojson }} <|end|> {% endif %}" + CHAT_TEMPLATE)


def build_json_lm(directory: Path, *, seed: int = 0) -> Path:
    """Save a 2-layer Llama with a byte-level BPE tokenizer (every character can be written,
    JSON included; merges learned from JSON-like lines) and a chat template that lists the
    tools, for the structured-output tests. Random weights: its answers are noise that only
    a grammar can shape."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = ['{"name": "red", "count": 12, "tags": ["a", "b"], "ok": true}',
             '{"city": "Paris", "unit": "celsius"} the cat sat on the mat', "hello world"]
    tok.train_from_iterator(lines * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>",
                                        pad_token="</s>", chat_template=TOOLS_TEMPLATE,
                                        model_max_length=1024)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False, initializer_range=0.5)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    directory.mkdir(parents=True, exist_ok=True)
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_causal_lm(directory: Path, *, seed: int = 0) -> Path:
    """Save a 2-layer Llama with hidden size 32 and the word tokenizer to ``directory``."""
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=CONTEXT,
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
        tie_word_embeddings=False, initializer_range=0.5)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[list(ids.values())] = 0.0  # see the module docstring
    directory.mkdir(parents=True, exist_ok=True)
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def with_eos(source: Path, directory: Path, eos_token_id: int) -> Path:
    """A copy of ``source`` whose generation config also ends on ``eos_token_id``."""
    shutil.copytree(source, directory)
    path = directory / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    config["eos_token_id"] = [config.get("eos_token_id", 3), eos_token_id]
    path.write_text(json.dumps(config))
    return directory


def build_encoder(directory: Path, *, seed: int = 0) -> Path:
    """Save a 2-layer BERT encoder (for feature-extraction) with the word tokenizer."""
    import torch
    import transformers

    tokenizer = word_tokenizer()
    config = transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=CONTEXT,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    transformers.utils.logging.disable_progress_bar()
    transformers.BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory



IMAGE_LABELS = {0: "cat", 1: "dog", 2: "car", 3: "tree"}


def build_vit_tagger(directory: Path, **sizes: Any) -> Path:
    """Save a random ViT image classifier (32×32 images, labels :data:`IMAGE_LABELS`) with
    its image processor; ``sizes``: the config's hidden sizes and initializer range."""
    import transformers

    transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=8, num_labels=len(IMAGE_LABELS), id2label=IMAGE_LABELS,
        label2id={v: k for k, v in IMAGE_LABELS.items()}, **sizes)).save_pretrained(directory)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def build_blip_captioner(directory: Path, words: Any, **sizes: Any) -> Path:
    """Save a random BLIP captioner (32×32 images) with a word-piece vocabulary of ``words``
    after BERT's special tokens and ``[DEC]`` (its first decoder token)."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *words])
                     + "\n", encoding="utf-8")
    tokenizer = transformers.BertTokenizer(str(vocab), bos_token="[DEC]")
    config = transformers.BlipConfig(
        text_config=dict(vocab_size=tokenizer.vocab_size, max_position_embeddings=64,
                         bos_token_id=5, pad_token_id=0, sep_token_id=3, eos_token_id=3, **sizes),
        vision_config=dict(image_size=32, patch_size=8, **sizes), projection_dim=16)
    transformers.BlipForConditionalGeneration(config).save_pretrained(directory)
    transformers.BlipProcessor(
        image_processor=transformers.BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer).save_pretrained(directory)
    return directory


class GatedLM(TransformersModel):
    """A TransformersModel whose every step first takes a turn from ``turns`` (a semaphore
    the test releases, so the test decides when each step runs) and logs its rows:
    ``log[0]`` counts the steps, ``log[1 + i]`` holds the rows of step ``i``. Step number
    ``fail_at`` raises."""

    def __init__(self, path: Any, turns: Any, log: Any, fail_at: int = -1,
                 **settings: Any) -> None:
        super().__init__(path, **settings)
        self.turns = turns
        self.log = log
        self.fail_at = fail_at

    def step(self, states: list[Any]) -> list[Any]:
        if not self.turns.acquire(timeout=60):
            raise RuntimeError("the test gave no turn for a minute")
        number = int(self.log[0])
        if number + 1 < len(self.log):
            self.log[number + 1] = sum(state.rows for state in states)
        self.log[0] = number + 1
        if number == self.fail_at:
            raise RuntimeError(f"step {number} fails on purpose")
        return super().step(states)
