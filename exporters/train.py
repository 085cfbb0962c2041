"""Training, d2l's recipe by default (d2l.ai §9.1: batch 32, 35 steps, SGD lr 1, clip 1,
500 epochs on the first 10,000 tokens, sequential partitioning)."""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from exporters.corpus import (
    DEFAULT_MAX_TOKENS,
    Corpus,
    seq_data_iter_random,
    seq_data_iter_sequential,
)
from exporters.model import Checkpoint, GRULanguageModel, ModelConfig, greedy_continue, torch_step
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


def train(cfg: TrainConfig, corpus: Corpus | None = None, show_progress: bool = True) -> TrainResult:
    corpus = corpus or Corpus.time_machine()
    train_ids, heldout = corpus.split(cfg.max_tokens, cfg.holdout)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = GRULanguageModel(ModelConfig(len(corpus.vocab), cfg.hidden_size, cfg.num_layers, cfg.dropout))
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    else:
        raise ValueError(f"optimizer must be sgd or adam, got {cfg.optimizer!r}")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs) if cfg.optimizer == "adam" else None

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
                logits, state = model(x, state)
                loss = F.cross_entropy(logits, y.T.reshape(-1))
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                opt.step()
                loss_sum += float(loss.detach()) * y.numel()
                count += y.numel()
            if sched:
                sched.step()
            train_seconds += time.perf_counter() - t0
            tokens_seen += count
            ppl = math.exp(loss_sum / count)
            status = f"ppl {ppl:.3f}  {tokens_seen / train_seconds:,.0f} tok/s"
            if heldout and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
                model.eval()
                shape = (cfg.num_layers, cfg.hidden_size)
                held = stream_perplexity(torch_step(model), heldout, shape)
                status += f"  held-out {held:.3f}"
            progress.update(task, advance=1, status=status)
            if epoch % max(1, cfg.epochs // 20) == 0 and not progress.console.is_terminal:
                progress.console.print(f"epoch {epoch}/{cfg.epochs} {status}")
    model.eval()
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
