"""Build the reference model zoo: tokenizer, small causal LMs, model cards.

``lwq zoo build`` fetches the corpus (``lwq.zoo.corpus``), trains a byte-level
BPE tokenizer and one model per ``ZooModelSpec`` on 2 CPU cores in float32,
with fixed seeds, and writes standard Hugging Face directories (16-bit
safetensors weights, config, tokenizer, card). Everything is written into a
temporary directory beside the target and moved into place only at the end,
so a failed build never touches a zoo that is already there.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from tqdm.auto import tqdm

from lwq.errors import ConfigError, LwqError
from lwq.eval.perplexity import perplexity_of_text
from lwq.models import load_model_dir
from lwq.zoo.corpus import (
    DOC_SEPARATOR,
    SPLITS,
    CorpusSource,
    Document,
    fetch_corpus,
    split_documents,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
VOCAB_SIZE = 4096
MIN_FREE_BYTES = 300 * 2**20  # corpus (60 MB unpacked) + models + slack
SAMPLE_PROMPT = "The :mod:`os` module"
DEFAULT_OUT = Path("zoo")


@dataclass(frozen=True)
class ZooModelSpec:
    """One reference model: architecture and training recipe."""

    name: str
    family: Literal["llama", "gpt2"]
    hidden: int
    layers: int
    heads: int
    intermediate: int
    seq_len: int = 256
    steps: int = 1800
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0

    def make_config(self, vocab_size: int, eos_id: int) -> object:
        # Every linear input dimension (hidden, intermediate) is a multiple of
        # 128 so that group sizes 64 and 128 divide it.
        if self.family == "llama":
            from transformers import LlamaConfig

            return LlamaConfig(
                vocab_size=vocab_size,
                hidden_size=self.hidden,
                intermediate_size=self.intermediate,
                num_hidden_layers=self.layers,
                num_attention_heads=self.heads,
                num_key_value_heads=self.heads,
                max_position_embeddings=self.seq_len,
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
                bos_token_id=eos_id,
                eos_token_id=eos_id,
                pad_token_id=eos_id,
            )
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=self.seq_len,
            n_embd=self.hidden,
            n_layer=self.layers,
            n_head=self.heads,
            n_inner=self.intermediate,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        )


ZOO_SPECS: tuple[ZooModelSpec, ...] = (
    ZooModelSpec("llama-6l-128d", "llama", hidden=128, layers=6, heads=4, intermediate=384),
    ZooModelSpec("gpt2-6l-128d", "gpt2", hidden=128, layers=6, heads=4, intermediate=512),
)


@dataclass(frozen=True)
class ZooModelCard:
    """What ``card.json`` records; the test suite checks the model against it."""

    name: str
    family: str
    architecture: str
    n_params: int
    n_params_non_embedding: int
    tokens_seen: int
    train_seconds: float
    final_train_loss: float
    validation_perplexity: float
    validation_tokens: int
    vocab_size: int
    weights_dtype: str
    corpus: dict[str, object]
    recipe: dict[str, object]
    command: str
    sample_prompt: str
    sample: str
    torch_version: str
    torch_threads: int
    extra: dict[str, object] = field(default_factory=dict)


def train_tokenizer(docs: Sequence[Document], vocab_size: int, seq_len: int) -> object:
    """Byte-level BPE over the training documents, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in docs), trainer=trainer, length=len(docs))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=seq_len,
    )


def token_stream(tokenizer: object, docs: Sequence[Document]) -> torch.Tensor:
    """All documents tokenised and joined, an EOS after each: (n_tokens,)."""
    eos_id = tokenizer.eos_token_id  # type: ignore[attr-defined]
    ids: list[int] = []
    for doc in docs:
        enc = tokenizer(doc.text, add_special_tokens=False, verbose=False)  # type: ignore[operator]
        ids.extend(enc["input_ids"])
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def _lr_at(step: int, spec: ZooModelSpec) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_model(
    spec: ZooModelSpec, stream: torch.Tensor, vocab_size: int, eos_id: int
) -> tuple["PreTrainedModel", dict[str, float]]:
    """Train one model from scratch in float32 on random windows of ``stream``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.seed)
    config = spec.make_config(vocab_size, eos_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": spec.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=spec.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(spec.seed)
    n_starts = stream.numel() - spec.seq_len
    if n_starts <= 0:
        raise ConfigError(f"training stream of {stream.numel()} tokens is shorter than seq_len")
    recent: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(spec.steps), desc=f"train {spec.name}", unit="step", mininterval=10)
    for step in bar:
        starts = torch.randint(0, n_starts, (spec.batch_size,), generator=gen)
        # (B, T) windows; labels are the inputs, transformers shifts them.
        batch = torch.stack([stream[s : s + spec.seq_len] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, spec)
        loss = model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise LwqError(f"training {spec.name} diverged at step {step}: lower the lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-50:]
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
            log.info("%s step %d loss %.4f", spec.name, step, sum(recent) / len(recent))
    seconds = time.perf_counter() - t0
    model.eval()
    stats = {
        "train_seconds": seconds,
        "final_train_loss": sum(recent) / len(recent),
        "tokens_seen": spec.steps * spec.batch_size * spec.seq_len,
    }
    return model, stats


def generate_sample(model: "PreTrainedModel", tokenizer: object, prompt: str, seed: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    torch.manual_seed(seed)
    out = model.generate(  # type: ignore[operator]
        ids,
        max_new_tokens=80,
        do_sample=True,
        temperature=0.8,
        top_k=40,
        pad_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
    )
    return str(tokenizer.decode(out[0], skip_special_tokens=True))  # type: ignore[attr-defined]


def _card_markdown(card: ZooModelCard) -> str:
    c = card.corpus
    r = card.recipe
    return f"""# {card.name}

A small {card.architecture} causal language model built by `lwq zoo build` as a
reference model for testing and benchmarking post-training quantization. It is
trained from scratch on the reStructuredText sources of the Python 3.11
documentation. It is not meant for any other use.

| field | value |
|---|---|
| architecture | {card.architecture} ({card.family} family) |
| layers / hidden / heads / MLP | {r["layers"]} / {r["hidden"]} / {r["heads"]} / {r["intermediate"]} |
| parameters | {card.n_params:,} ({card.n_params_non_embedding:,} outside embeddings and head) |
| vocabulary | {card.vocab_size} (byte-level BPE, shared by the zoo) |
| context length | {r["seq_len"]} |
| tokens seen | {card.tokens_seen:,} ({r["steps"]} steps x {r["batch_size"]} x {r["seq_len"]}) |
| training time | {card.train_seconds:.0f} s on {card.torch_threads} CPU threads, float32, torch {card.torch_version} |
| final training loss | {card.final_train_loss:.4f} (mean of the last 50 steps) |
| validation perplexity | **{card.validation_perplexity:.3f}** on `data/validation.txt` ({card.validation_tokens:,} tokens, windows of {r["seq_len"]}) |
| weights on disk | {card.weights_dtype} safetensors (lwq loads them in float32 for CPU compute) |
| corpus | Debian `{c["package"]}` {c["version"]}, .deb SHA-256 `{c["deb_sha256"]}` |
| corpus text SHA-256 | `{c["text_sha256"]}` ({c["n_files"]} files, {c["n_bytes"]:,} bytes) |
| split | by SHA-256 of each file path: 90 % train, 5 % validation, 5 % calibration |

Rebuild (reproduces the tokenizer exactly and the perplexity within 2 %):

```
{card.command}
```

Sample (prompt `{card.sample_prompt}`, temperature 0.8, top-k 40, seed 0):

```
{card.sample}
```
"""


@contextmanager
def _staging_dir(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out``; removed unless moved into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_free_space(where: Path, need: int) -> None:
    free = shutil.disk_usage(where).free
    if free < need:
        raise LwqError(
            f"only {free / 2**20:.0f} MiB free on the disk of {where}; 'lwq zoo build' needs "
            f"about {need / 2**20:.0f} MiB: free some space or choose --out on another disk"
        )


def _swap_into_place(staged: Path, out: Path) -> None:
    """Replace ``out`` by ``staged`` with two renames (old zoo removed last)."""
    old = out.with_name(f".{out.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.replace(out, old)
    staged.chmod(0o755)  # mkdtemp makes it private
    os.replace(staged, out)
    if old.exists():
        shutil.rmtree(old)


def _write_data(stage: Path, source: CorpusSource, splits: dict[str, list[Document]]) -> None:
    data = stage / "data"
    data.mkdir()
    manifest: dict[str, object] = {"corpus": asdict(source), "splits": {}}
    for name in ("validation", "calibration"):
        text = DOC_SEPARATOR.join(d.text for d in splits[name])
        (data / f"{name}.txt").write_text(text, encoding="utf-8")
    for name in SPLITS:
        manifest["splits"][name] = [  # type: ignore[index]
            {"path": d.relpath, "sha256": d.sha256} for d in splits[name]
        ]
    (data / "split.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def build_zoo(
    out: Path = DEFAULT_OUT,
    deb: Path | None = None,
    specs: Sequence[ZooModelSpec] = ZOO_SPECS,
    command: str = "lwq zoo build",
) -> list[ZooModelCard]:
    """Build every model in ``specs`` into ``out``; return their cards."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_free_space(out.parent, MIN_FREE_BYTES)
    try:
        with _staging_dir(out) as stage:
            cards = _build_into(stage, deb, specs, command)
            _swap_into_place(stage, out)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise LwqError(
                f"the disk of {out.parent} filled up during 'lwq zoo build'; free some space or "
                f"choose --out on another disk (the previous {out} is untouched)"
            ) from err
        raise
    return cards


def _build_into(
    stage: Path, deb: Path | None, specs: Sequence[ZooModelSpec], command: str
) -> list[ZooModelCard]:
    source, docs = fetch_corpus(stage / "work", deb)
    log.info("corpus %s %s: %d files, sha256 %s", source.package, source.version,
             source.n_files, source.text_sha256)
    splits = split_documents(docs)
    _write_data(stage, source, splits)  # type: ignore[arg-type]
    shutil.rmtree(stage / "work")
    max_len = max(s.seq_len for s in specs)
    tokenizer = train_tokenizer(splits["train"], VOCAB_SIZE, max_len)
    stream = token_stream(tokenizer, splits["train"])
    log.info("training stream: %d tokens", stream.numel())
    validation = (stage / "data" / "validation.txt").read_text(encoding="utf-8")
    eos_id = int(tokenizer.eos_token_id)  # type: ignore[attr-defined]
    cards = []
    for spec in specs:
        model, stats = train_model(spec, stream, len(tokenizer), eos_id)  # type: ignore[arg-type]
        target = stage / spec.name
        model.to(torch.float16)  # type: ignore[arg-type]
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)  # type: ignore[attr-defined]
        del model
        # The card describes the model as stored (16-bit weights), reloaded.
        model, tok = load_model_dir(target)
        ppl = perplexity_of_text(model, tok, validation, spec.seq_len)
        n_params = sum(p.numel() for p in model.parameters())
        emb: torch.Tensor = model.get_input_embeddings().weight  # type: ignore[assignment]
        head: torch.Tensor = model.get_output_embeddings().weight  # type: ignore[union-attr,assignment]
        n_head = 0 if head is emb else head.numel()
        card = ZooModelCard(
            name=spec.name,
            family=spec.family,
            architecture=type(model).__name__,
            n_params=n_params,
            n_params_non_embedding=n_params - emb.numel() - n_head,
            tokens_seen=int(stats["tokens_seen"]),
            train_seconds=round(stats["train_seconds"], 1),
            final_train_loss=round(stats["final_train_loss"], 4),
            validation_perplexity=round(ppl.perplexity, 4),
            validation_tokens=ppl.n_tokens,
            vocab_size=len(tok),  # type: ignore[arg-type]
            weights_dtype="float16",
            corpus=asdict(source),
            recipe=asdict(spec),
            command=command,
            sample_prompt=SAMPLE_PROMPT,
            sample=generate_sample(model, tok, SAMPLE_PROMPT, seed=0),
            torch_version=torch.__version__,
            torch_threads=torch.get_num_threads(),
        )
        (target / "card.json").write_text(json.dumps(asdict(card), indent=1) + "\n")
        (target / "README.md").write_text(_card_markdown(card))
        log.info("%s: validation perplexity %.3f", spec.name, ppl.perplexity)
        cards.append(card)
    return cards
