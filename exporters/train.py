"""Training, d2l's recipe by default (d2l.ai §9.1: batch 32, 35 steps, SGD lr 1, clip 1,
500 epochs on the first 10,000 tokens, sequential partitioning)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from exporters.corpus import (
    DEFAULT_MAX_TOKENS,
    Corpus,
    CorpusError,
    read_text_corpus,
    seq_data_iter_random,
    seq_data_iter_sequential,
    split_text,
    time_machine_path,
)
from exporters.embedding import EmbeddingConfig, EmbeddingGRULM
from exporters.evaluation import corpus_info, heldout_metrics, perplexities, tokenized_split
from exporters.model import (
    Checkpoint,
    GRULanguageModel,
    ModelConfig,
    greedy_continue,
    module_checkpoint,
    torch_step,
)
from exporters.tokenizer import Tokenizer, train_tokenizer
from gru_serve.scoring import d2l_perplexity, stream_perplexity

SAMPLE_PREFIXES = ("time traveller", "traveller")


@dataclass(frozen=True)
class TrainConfig:
    hidden_size: int = 256
    num_layers: int = 1
    dropout: float = 0.0
    batch_size: int = 32
    num_steps: int = 35
    epochs: int = 500
    lr: float = 1.0
    optimizer: str = "sgd"  # sgd (d2l) | adam
    clip: float = 1.0
    max_tokens: int = DEFAULT_MAX_TOKENS
    holdout: float = 0.0
    random_iter: bool = False
    seed: int = 0
    eval_every: int = 10  # epochs between held-out evaluations (shown, never used to pick a model)


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Checkpoint
    metrics: dict[str, float]
    samples: dict[str, str]


def evaluate(model: GRULanguageModel, train: list[int], heldout: list[int]) -> dict[str, float]:
    model.eval()
    step = torch_step(model)
    shape = (model.config.num_layers, model.config.hidden_size)
    metrics = {
        "train_d2l": d2l_perplexity(step, train, shape),
        "train_stream": stream_perplexity(step, train, shape),
    }
    if heldout:
        metrics["heldout_stream"] = stream_perplexity(step, heldout, shape)
    return metrics


def _optimizer(model: torch.nn.Module, cfg: TrainConfig):
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    else:
        raise ValueError(f"optimizer must be sgd or adam, got {cfg.optimizer!r}")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs) if cfg.optimizer == "adam" else None
    return opt, sched


def _fit(
    model,
    forward: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    train_ids: list[int],
    heldout_status: Callable[[], str] | None,
    rng: random.Random,
    show_progress: bool,
) -> tuple[float, int, float]:
    """The training loop (progress bar, periodic held-out report); returns the last epoch's
    training perplexity, tokens seen and seconds spent training."""
    opt, sched = _optimizer(model, cfg)
    tokens_seen, train_seconds, ppl = 0, 0.0, float("nan")
    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        TextColumn("epoch {task.completed}/{task.total}"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not show_progress, transient=False) as progress:
        task = progress.add_task("train", total=cfg.epochs, status="")
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            state, loss_sum, count = None, 0.0, 0
            t0 = time.perf_counter()
            batches = (seq_data_iter_random if cfg.random_iter else seq_data_iter_sequential)(
                train_ids, cfg.batch_size, cfg.num_steps, rng
            )
            for x, y in batches:
                if state is None or cfg.random_iter:
                    state = model.begin_state(x.shape[0])
                else:
                    state = state.detach()
                logits, state = forward(x, state)
                loss = F.cross_entropy(logits, y.T.reshape(-1))
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                opt.step()
                loss_sum += float(loss.detach()) * y.numel()
                count += y.numel()
            if not count:
                raise CorpusError(
                    f"{len(train_ids):,} training tokens are too few for one batch of {cfg.batch_size} x "
                    f"{cfg.num_steps} steps: lower --batch-size or --num-steps"
                )
            if sched:
                sched.step()
            train_seconds += time.perf_counter() - t0
            tokens_seen += count
            ppl = math.exp(loss_sum / count)
            status = f"ppl {ppl:.3f}  {tokens_seen / train_seconds:,.0f} tok/s"
            if heldout_status and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
                model.eval()
                status += heldout_status()
            progress.update(task, advance=1, status=status)
            if epoch % max(1, cfg.epochs // 20) == 0 and not progress.console.is_terminal:
                progress.console.print(f"epoch {epoch}/{cfg.epochs} {status}")
    model.eval()
    return ppl, tokens_seen, train_seconds


def train(cfg: TrainConfig, corpus: Corpus | None = None, show_progress: bool = True) -> TrainResult:
    """d2l's one-hot model on the Time Machine (d2l's normalised characters)."""
    corpus = corpus or Corpus.time_machine()
    train_ids, heldout = corpus.split(cfg.max_tokens, cfg.holdout)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = GRULanguageModel(ModelConfig(len(corpus.vocab), cfg.hidden_size, cfg.num_layers, cfg.dropout))

    def heldout_status() -> str:
        shape = (cfg.num_layers, cfg.hidden_size)
        return f"  held-out {stream_perplexity(torch_step(model), heldout, shape):.3f}"

    ppl, tokens_seen, train_seconds = _fit(
        model, model, cfg, train_ids, heldout_status if heldout else None, rng, show_progress
    )
    metrics = evaluate(model, train_ids, heldout)
    metrics["train_epoch_last"] = ppl
    metrics["tokens_per_second"] = tokens_seen / train_seconds
    metrics["train_seconds"] = train_seconds
    samples = {p: greedy_continue(model, corpus.vocab, p, 50) for p in SAMPLE_PREFIXES}
    info = {
        "recipe": asdict(cfg),
        "metrics": metrics,
        "samples": samples,
        "corpus_sha1": corpus.sha1,
        "train_tokens": len(train_ids),
        "heldout_tokens": len(heldout),
        "torch": torch.__version__,
    }
    return TrainResult(Checkpoint(model, corpus.vocab, info), metrics, samples)


@dataclass(frozen=True)
class TokenizerTrainConfig(TrainConfig):
    """An embedding-input GRU (exporters.embedding.EmbeddingGRULM) with a tokenizer trained on
    the corpus (char, word or bpe:N), on any UTF-8 text; the last `holdout` of the text is
    held out (corpus.split_text) and the tokenizer never sees it."""

    corpus: str = ""  # a UTF-8 text file; "" : the Time Machine, as the book is (not normalised)
    tokenizer: str = "bpe:1000"
    embedding_size: int = 128
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.3
    tie_weights: bool = False
    epochs: int = 20
    lr: float = 0.003
    optimizer: str = "adam"
    max_tokens: int = 0
    holdout: float = 0.1
    eval_every: int = 1


def sample_prefixes(text: str, sha1: str) -> tuple[str, ...]:
    from exporters.corpus import TIME_MACHINE_SHA1

    if sha1 == TIME_MACHINE_SHA1:
        return ("The Time Traveller", "I")
    first = next((line.strip() for line in text.split("\n") if line.strip()), text[:20])
    return (first[:20],)


def greedy_tokens(step, tokenizer: Tokenizer, prefix: str, shape: tuple[int, int], n: int = 50) -> str:
    """The prefix and n greedily chosen tokens after it, decoded (a trailing <eos> that the
    "words" tokenizer adds at the end of the prefix's line is left out)."""
    ids = tokenizer.encode(prefix)
    eos = tokenizer.spec.get("eos")
    if eos and ids and tokenizer.tokens[ids[-1]] == eos and not prefix.endswith("\n"):
        ids = ids[:-1]
    out = list(ids)
    logits, state = step(np.array([ids], np.int64), np.zeros((1, *shape), np.float32))
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits, state = step(np.array([[out[-1]]], np.int64), state)
    return tokenizer.decode(out)


def train_tokenized(cfg: TokenizerTrainConfig, show_progress: bool = True) -> TrainResult:
    """Train a tokenizer on the training part of the corpus, then an EmbeddingGRULM on its
    tokens; the checkpoint holds the tokenizer and where the corpus is."""
    path = Path(cfg.corpus) if cfg.corpus else time_machine_path()
    text, sha1 = read_text_corpus(path)
    train_text, _ = split_text(text, cfg.holdout)
    tokenizer = train_tokenizer(cfg.tokenizer, train_text)
    split = tokenized_split(tokenizer.encode, text, cfg.holdout, cfg.max_tokens)[0]
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = EmbeddingGRULM(
        EmbeddingConfig(
            len(tokenizer), cfg.embedding_size, cfg.hidden_size, cfg.num_layers, cfg.dropout, cfg.tie_weights
        )
    )
    info = {"corpus": corpus_info(path, sha1, text, cfg.holdout, cfg.max_tokens)}
    ck = module_checkpoint(model, tokenizer, True, info, "gru-export train checkpoint")
    shape = (cfg.num_layers, cfg.hidden_size)

    def heldout_status() -> str:
        m = heldout_metrics(torch_step(ck), split, shape)
        return f"  held-out {m['heldout_stream']:.3f} ({m['heldout_bpc']:.3f} bits/char)"

    def forward(x: torch.Tensor, state: torch.Tensor):
        return model(x.T, state)

    ppl, tokens_seen, train_seconds = _fit(
        model, forward, cfg, split.train, heldout_status if split.heldout else None, rng, show_progress
    )
    step = torch_step(ck)
    metrics = perplexities(step, split, shape)
    metrics["train_epoch_last"] = ppl
    metrics["tokens_per_second"] = tokens_seen / train_seconds
    metrics["train_seconds"] = train_seconds
    samples = {p: greedy_tokens(step, tokenizer, p, shape) for p in sample_prefixes(text, sha1)}
    info |= {
        "recipe": asdict(cfg),
        "metrics": metrics,
        "samples": samples,
        "corpus_sha1": sha1,
        "train_tokens": len(split.train),
        "heldout_tokens": len(split.heldout),
        "heldout_chars": split.heldout_chars,
        "torch": torch.__version__,
    }
    return TrainResult(replace(ck, info=info), metrics, samples)
