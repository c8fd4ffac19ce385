"""A tiny Llama model built locally, reproducibly, from a fixed seed.

Tests and the default local stack serve it, so nothing is ever downloaded: a
2-layer Llama (hidden size 128, head size 64, the smallest head size vLLM's
CPU attention accepts) with random weights and a 512-token byte-level BPE
tokenizer trained on ``corpus.txt``. It produces meaningless text at real
engine speed; point the inference settings at a real model directory for
real text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

SEED = 20261129
VOCAB_SIZE = 512
# Bump when the recipe changes so that cached copies are rebuilt.
RECIPE_VERSION = 1
_STAMP = "sluice-tiny-model.json"
_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def recipe() -> dict[str, object]:
    """What identifies a build: a directory with the same recipe is reused."""
    corpus = resources.files(__package__).joinpath("corpus.txt").read_bytes()
    return {
        "recipe_version": RECIPE_VERSION,
        "seed": SEED,
        "vocab_size": VOCAB_SIZE,
        "corpus_sha256": hashlib.sha256(corpus).hexdigest(),
    }


def is_built(model_dir: Path) -> bool:
    stamp = model_dir / _STAMP
    return stamp.is_file() and json.loads(stamp.read_text()) == recipe()


def ensure(model_dir: Path) -> Path:
    """Build the tiny model into ``model_dir`` unless an identical build is there."""
    if is_built(model_dir):
        return model_dir
    build(model_dir)
    return model_dir


def build(model_dir: Path) -> None:
    """Build into a temporary directory, then move it into place atomically."""
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_dir.parent, prefix=".tiny-model-") as tmp:
        staging = Path(tmp) / "model"
        _build_into(staging)
        (staging / _STAMP).write_text(json.dumps(recipe(), indent=2) + "\n")
        if model_dir.exists():
            shutil.rmtree(model_dir)
        staging.rename(model_dir)
    logger.info("built the tiny model in %s", model_dir)


def _build_into(out: Path) -> None:
    # Heavy imports stay inside the function: vLLM's spawned engine processes
    # import this package's siblings and must not pay for them.
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = resources.files(__package__).joinpath("corpus.txt").read_text()
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus.splitlines(), trainer=trainer)
    bos_id = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    tokenizer.model_max_length = 2048

    config = LlamaConfig(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=bos_id,
        eos_token_id=bpe.token_to_id("</s>"),
        pad_token_id=bpe.token_to_id("</s>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
