"""Train the tiny built-in demo model shipped in ``olmo_model/demo_model/``.

Why this script exists
----------------------
The serving stack needs a model that can be built and run anywhere, with no
network access and no multi-gigabyte checkpoint.  A randomly initialised
model would do for checking shapes, but it prints noise, which makes it
useless for judging by eye whether prefill, decode, KV-cache transfer and
detokenisation work end to end.  This script therefore makes a small OLMo
(model_type ``"olmo"``: OLMo-1 with non-affine LayerNorm) that has actually
been trained for a few minutes on CPU, so that greedy decoding prints
English-looking words.

Everything is made locally.  The corpus and tokenizer are deterministic
(given the same Python and library versions); training is repeatable too
when it is bounded by ``--steps`` rather than by ``--minutes``:

1. Training text is English that ships with Python itself: the help texts
   in ``pydoc_data.topics.topics`` plus the docstrings of a fixed list of
   standard-library modules.
2. A byte-level BPE tokenizer (about 2048 tokens) is trained on that text
   with the ``tokenizers`` library.  ``<|endoftext|>`` is token 0 and serves
   as both eos and pad.
3. A small ``OlmoForCausalLM`` is trained with AdamW (linear warmup, cosine
   decay) for at most ``--steps`` steps and ``--minutes`` minutes.
4. ``config.json``, ``model.safetensors`` (float32, tied embeddings),
   ``tokenizer.json``, ``tokenizer_config.json`` (special tokens, OLMo's
   chat template) and a short ``README.md`` recording the run are
   written to the output directory, and nothing else.  The saved model is
   loaded back with ``OlmoForCausalLM.from_pretrained`` and sampled greedily
   before the files replace the old ones.

Usage (the shipped model was made with the second command; its README.md
records the run)::

    python scripts/train_demo_model.py --minutes 6
    python scripts/train_demo_model.py --out olmo_model/demo_model --steps 2400 --minutes 20
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from pydoc_data.topics import topics

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import OlmoConfig, OlmoForCausalLM

EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 2048
SEQ_LEN = 128
BATCH_SIZE = 16
PEAK_LR = 3e-3
MIN_LR_RATIO = 0.1
WARMUP_STEPS = 40
WEIGHT_DECAY = 0.1
LOG_EVERY = 25
HELD_OUT_FRACTION = 0.02
SAMPLE_PROMPTS = ("The Python interpreter", "A function is")
SAMPLE_NEW_TOKENS = 24
OUTPUT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "README.md"}
# OLMo's instruct format, so that /v1/chat/completions works on the demo model (which was
# never tuned to chat: its answers read like Python's documentation, nothing more).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")

# Standard-library modules whose docstrings are added to the training text.
# The list is fixed (not discovered) so the corpus does not depend on what
# happens to be importable, and so no module with import side effects runs.
DOC_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect",
    "builtins", "calendar", "cmd", "codecs", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "doctest", "email.message", "enum", "filecmp",
    "fnmatch", "fractions", "functools", "getopt", "gettext", "glob", "graphlib",
    "gzip", "hashlib", "heapq", "html", "http.client", "http.server",
    "importlib", "inspect", "io", "ipaddress", "itertools", "json", "locale",
    "logging", "math", "mimetypes", "numbers", "operator", "optparse", "os",
    "pathlib", "pdb", "pickle", "pkgutil", "platform", "pprint", "queue",
    "random", "re", "reprlib", "sched", "secrets", "selectors", "shlex",
    "shutil", "signal", "socket", "socketserver", "sqlite3", "statistics",
    "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "time", "timeit", "tokenize", "traceback", "types", "typing",
    "unittest", "urllib.parse", "uuid", "warnings", "weakref",
    "xml.etree.ElementTree", "zipfile",
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path("olmo_model/demo_model"),
        help="output directory (default: %(default)s)",
    )
    parser.add_argument(
        "--minutes", type=float, default=6.0,
        help="wall-time budget for the training loop (default: %(default)s)",
    )
    parser.add_argument(
        "--steps", type=int, default=2400,
        help="upper bound on optimiser steps (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    return parser.parse_args()


# --------------------------------------------------------------------------
# Training text
# --------------------------------------------------------------------------

def module_docstrings(module_name: str) -> Iterator[str]:
    """Yield the docstrings of a module and of the public objects it defines."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return
    if doc := inspect.getdoc(module):
        yield doc
    for name in sorted(vars(module)):
        obj = getattr(module, name)
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if doc := inspect.getdoc(obj):
            yield doc
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                member = vars(obj)[attr]
                if attr.startswith("_") or not callable(member):
                    continue
                if doc := inspect.getdoc(member):
                    yield doc


def build_corpus() -> list[str]:
    """Return the training documents in a fixed order, without duplicates."""
    documents = [topics[key].strip() for key in sorted(topics)]
    for module_name in DOC_MODULES:
        documents.extend(doc.strip() for doc in module_docstrings(module_name))
    return [doc for doc in dict.fromkeys(documents) if len(doc) >= 40]


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

def train_tokenizer(documents: list[str]) -> Tokenizer:
    """Train a byte-level BPE whose first token is ``<|endoftext|>``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def encode_corpus(tokenizer: Tokenizer, documents: list[str], eos_id: int) -> torch.Tensor:
    """Concatenate all documents into one token stream, each followed by eos."""
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(documents):
        ids.extend(encoding.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------
# Model and training
# --------------------------------------------------------------------------

def make_config(vocab_size: int, eos_id: int) -> OlmoConfig:
    # Sized so the float32 checkpoint stays under 8 MB: with tied embeddings
    # this is 1.87M parameters.  head_dim is 192 / 6 = 32, with two query
    # heads per key/value head (GQA).
    return OlmoConfig(
        vocab_size=vocab_size,
        hidden_size=192,
        intermediate_size=448,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=3,
        hidden_act="silu",
        max_position_embeddings=512,
        rope_theta=10000.0,
        attention_bias=False,
        attention_dropout=0.0,
        clip_qkv=None,
        tie_word_embeddings=True,
        initializer_range=0.02,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def learning_rate(progress: float, step: int) -> float:
    """Linear warmup to PEAK_LR, then cosine decay to MIN_LR_RATIO * PEAK_LR.

    ``progress`` runs from 0 to 1 over the whole run (see ``train``).
    """
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return PEAK_LR * (MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * cosine)


def random_batch(tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Sample BATCH_SIZE random windows of SEQ_LEN tokens."""
    starts = torch.randint(0, tokens.numel() - SEQ_LEN, (BATCH_SIZE,), generator=generator)
    return torch.stack([tokens[start : start + SEQ_LEN] for start in starts.tolist()])


@torch.no_grad()
def evaluate(model: OlmoForCausalLM, tokens: torch.Tensor) -> float:
    """Mean loss over consecutive, non-overlapping windows of held-out text."""
    model.eval()
    usable = (tokens.numel() // SEQ_LEN) * SEQ_LEN
    windows = tokens[:usable].view(-1, SEQ_LEN)
    losses = [
        model(input_ids=chunk, labels=chunk).loss.item()
        for chunk in windows.split(BATCH_SIZE)
    ]
    model.train()
    return sum(losses) / len(losses)


def train(
    model: OlmoForCausalLM,
    train_tokens: torch.Tensor,
    max_steps: int,
    budget_s: float,
    seed: int,
) -> tuple[float, int, float]:
    """Train in place.

    Returns the mean training loss of the last LOG_EVERY steps, the number
    of steps taken and the seconds spent.

    The run ends at ``max_steps`` or when ``budget_s`` seconds have passed,
    whichever comes first, and the cosine schedule follows whichever of the
    two is further along.  So the learning rate always decays fully, even
    when the CPU is shared and steps take longer than expected.  (With a
    generous time budget the run is bounded by steps and fully repeatable.)
    """
    generator = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    param_groups = [
        {"params": decay, "weight_decay": WEIGHT_DECAY},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        param_groups,
        lr=PEAK_LR,
        betas=(0.9, 0.95),
    )
    model.train()
    losses: list[float] = []
    start = time.monotonic()
    progress = 0.0
    while progress < 1.0:
        step = len(losses)
        lr = learning_rate(progress, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = random_batch(train_tokens, generator)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())

        elapsed = time.monotonic() - start
        progress = max((step + 1) / max_steps, elapsed / budget_s)
        if (step + 1) % LOG_EVERY == 0 or progress >= 1.0:
            window = losses[-LOG_EVERY:]
            print(
                f"step {step + 1:5d}  loss {sum(window) / len(window):.4f}  lr {lr:.2e}  "
                f"{elapsed:5.0f}s  ({100 * min(1.0, progress):3.0f}%)",
                flush=True,
            )
    window = losses[-LOG_EVERY:]
    return sum(window) / len(window), len(losses), time.monotonic() - start


# --------------------------------------------------------------------------
# Saving and sampling
# --------------------------------------------------------------------------

def save(model: OlmoForCausalLM, tokenizer: Tokenizer, out_dir: Path) -> None:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json (the
    special tokens and the chat template), nothing else."""
    model.save_pretrained(out_dir)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    eos = tokenizer.id_to_token(model.config.eos_token_id)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": eos, "pad_token": eos,
         "chat_template": CHAT_TEMPLATE}, indent=2) + "\n")

    # Recent transformers nest rope_theta under "rope_parameters"; keep a
    # top-level copy too for loaders that expect the older flat layout.
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("rope_theta", model.config.rope_parameters["rope_theta"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    (out_dir / "generation_config.json").unlink(missing_ok=True)


def publish(staging_dir: Path, out_dir: Path) -> None:
    """Move the finished files into ``out_dir``, one atomic rename per file.

    Other processes (tests, a running server) may be reading the demo model,
    so no file in ``out_dir`` is ever seen half-written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in sorted(OUTPUT_FILES):
        source = staging_dir / name
        source.chmod(0o644)
        os.replace(source, out_dir / name)


def write_readme(
    out_dir: Path, args: argparse.Namespace, config: OlmoConfig, results: list[str]
) -> None:
    """Describe how the files in ``out_dir`` were made."""
    c = config
    command = (
        f"python scripts/train_demo_model.py --out {args.out} "
        f"--minutes {args.minutes:g} --steps {args.steps} --seed {args.seed}"
    )
    text = f"""# Built-in demo model

A tiny OLMo (`model_type: "olmo"`, {c.num_hidden_layers} layers, hidden size {c.hidden_size},
{c.num_attention_heads} query / {c.num_key_value_heads} key-value heads, vocabulary {c.vocab_size})
trained for a few minutes on CPU so that the serving demo prints
English-looking text instead of noise.  It knows little beyond the style
of Python's documentation.

Made by `scripts/train_demo_model.py` (see its docstring) with

    {command}

Training text: `pydoc_data.topics` plus standard-library docstrings.
Tokenizer: byte-level BPE trained on the same text; `<|endoftext|>` is
token {c.eos_token_id} and is both eos and pad.  Weights are float32.
`tokenizer_config.json` carries OLMo's chat template (`<|user|>` / `<|assistant|>`
turns) for `/v1/chat/completions`; the model was never tuned to chat.

Result of that run:

"""
    text += "".join(f"    {line}\n" for line in results)
    (out_dir / "README.md").write_text(text)


@torch.no_grad()
def greedy_continuation(model: OlmoForCausalLM, tokenizer: Tokenizer, prompt: str) -> str:
    input_ids = torch.tensor([tokenizer.encode(prompt).ids])
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=SAMPLE_NEW_TOKENS,
        do_sample=False,
    )
    return tokenizer.decode(output[0, input_ids.shape[1] :].tolist())


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)

    documents = build_corpus()
    num_chars = sum(map(len, documents))
    print(f"corpus: {len(documents)} documents, {num_chars:,} characters", flush=True)

    tokenizer = train_tokenizer(documents)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    sample = "naïve café — 東京 🐍"
    assert tokenizer.decode(tokenizer.encode(sample).ids) == sample, "byte-level round trip failed"
    print(f"tokenizer: vocab {tokenizer.get_vocab_size()}, {EOS_TOKEN} id {eos_id}", flush=True)

    tokens = encode_corpus(tokenizer, documents, eos_id)
    split = int(tokens.numel() * (1.0 - HELD_OUT_FRACTION))
    train_tokens, held_out_tokens = tokens[:split], tokens[split:]
    print(
        f"tokens: {train_tokens.numel():,} train, {held_out_tokens.numel():,} held out",
        flush=True,
    )

    config = make_config(tokenizer.get_vocab_size(), eos_id)
    model = OlmoForCausalLM(config)
    # eos doubles as pad, but the model must still learn to predict it, so
    # do not freeze its embedding row the way padding_idx would.
    model.model.embed_tokens.padding_idx = None
    with torch.no_grad():
        model.model.embed_tokens.weight[eos_id].normal_(0.0, config.initializer_range)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)

    final_loss, steps, seconds = train(
        model, train_tokens, args.steps, args.minutes * 60.0, args.seed
    )
    held_out_loss = evaluate(model, held_out_tokens)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out.parent, prefix=".demo_model-") as tmp:
        staging_dir = Path(tmp)
        save(model, tokenizer, staging_dir)
        model = OlmoForCausalLM.from_pretrained(staging_dir)  # check the files load back
        model.eval()
        results = [
            f"{prompt!r} -> {greedy_continuation(model, tokenizer, prompt)!r}"
            for prompt in SAMPLE_PROMPTS
        ]
        results.append(
            f"{steps} steps in {seconds / 60:.1f} min; "
            f"final train loss {final_loss:.4f}, held-out loss {held_out_loss:.4f}"
        )
        print("\n".join(results))
        write_readme(staging_dir, args, config, results)
        publish(staging_dir, args.out)
    for path in sorted(args.out.iterdir()):
        print(f"  {path}  {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
