"""Build a tiny, randomly initialised GPT-2 model and tokenizer on disk, fully offline.

The real model (DialoGPT) is hundreds of megabytes and lives on a hub that tests and
air-gapped machines cannot reach. A few-hundred-kilobyte model with the same
architecture and file layout exercises exactly the same loading and generation code, so
tests stay honest and anyone can try the whole system end to end without a download.
Its replies are gibberish: it has never been trained.

Standalone on purpose: it imports nothing else from the project.

    python -m worker.tiny_model models/tiny [--chat-template]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"
ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")
VOCAB_SIZE = 600

# Short chat lines in the two languages the product mostly sees; just enough text for the
# BPE trainer to learn a few hundred merges so that tokens are not single bytes.
CORPUS = (
    "Hi! How are you today?",
    "I'm fine, thanks. And you?",
    "Good morning, I would like to book a table for two.",
    "Sure, what time would you like to come?",
    "Tomorrow at eight in the evening, please.",
    "Your table is booked. See you tomorrow!",
    "What are your opening hours?",
    "We are open from nine to six, Monday to Friday.",
    "Can I pay by card?",
    "Yes, we accept all cards and cash.",
    "Where is my order? It has not arrived yet.",
    "Sorry about the delay, your order is on the way.",
    "Thank you very much for your help.",
    "You're welcome! Have a nice day.",
    "Do you deliver on weekends?",
    "Yes, we deliver on Saturday but not on Sunday.",
    "How much does the shipping cost?",
    "Shipping is free for orders over fifty dollars.",
    "I want to change my address.",
    "No problem, send me the new address please.",
    "Hola, ¿cómo estás?",
    "Muy bien, gracias. ¿Y tú?",
    "Buenos días, quisiera reservar una mesa para dos.",
    "Claro, ¿a qué hora le gustaría venir?",
    "Mañana a las ocho de la noche, por favor.",
    "¿Cuál es el horario de atención?",
    "Abrimos de nueve a seis, de lunes a viernes.",
    "¿Puedo pagar con tarjeta?",
    "Sí, aceptamos tarjetas y efectivo.",
    "¿Dónde está mi pedido? Todavía no llega.",
    "Perdón por la demora, su pedido ya está en camino.",
    "Muchas gracias por su ayuda.",
    "¡De nada! Que tenga un buen día.",
    "¿Hacen envíos los fines de semana?",
    "Sí, enviamos los sábados pero no los domingos.",
    "¿Cuánto cuesta el envío?",
    "El envío es gratis para pedidos de más de cincuenta dólares.",
    "Quiero cambiar mi dirección.",
    "No hay problema, envíeme la nueva dirección por favor.",
    "ok 👍 perfecto, nos vemos 😊",
)

# Role markers are special tokens, so `skip_special_tokens=True` removes them from replies.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}\n{% endif %}"
)


def _train_tokenizer() -> Tokenizer:
    """Byte-level BPE like GPT-2's: any UTF-8 text, emoji included, stays encodable."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=[END_OF_TEXT, *ROLE_MARKERS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return tokenizer


def build_tokenizer(*, context: int = 256, chat_template: bool = False) -> PreTrainedTokenizerFast:
    """The tokenizer alone, for callers that need no model weights."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        additional_special_tokens=list(ROLE_MARKERS),
        model_max_length=context,
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    path: Path | str,
    *,
    layers: int = 2,
    width: int = 64,
    heads: int = 2,
    context: int = 256,
    chat_template: bool = False,
    seed: int = 0,
    vocab_size: int | None = None,
) -> Path:
    """Write a loadable `from_pretrained` directory; the same seed gives the same weights.

    `vocab_size` above the tokenizer's widens the embedding and output layers only, so a
    benchmark can give the model the exact shape (and cost) of a real one (GPT-2: 50257).
    """
    if width % heads:
        raise ValueError(f"width ({width}) must be a multiple of heads ({heads})")
    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(context=context, chat_template=chat_template)
    tokenizer.save_pretrained(target)

    eos_id = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=max(len(tokenizer), vocab_size or 0),
        n_positions=context,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.tiny_model",
        description="Build a tiny random GPT-2 model to try the system without downloads.",
    )
    parser.add_argument("directory", type=Path, help="where to write the model")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--chat-template", action="store_true", help="give the tokenizer a chat template"
    )
    args = parser.parse_args(argv)
    if args.width % args.heads:
        parser.error(f"--width ({args.width}) must be a multiple of --heads ({args.heads})")

    path = build_tiny_model(
        args.directory,
        layers=args.layers,
        width=args.width,
        heads=args.heads,
        context=args.context,
        chat_template=args.chat_template,
        seed=args.seed,
    ).resolve()
    print(f"tiny model written to {path}")
    print(f"MODEL_NAME={path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
