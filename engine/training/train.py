"""Training loop of the default model: packed token windows -> LlamaForCausalLM weights.

Owns the model shape (`ModelSize`), AdamW and its schedule (linear warmup, cosine to 10%),
gradient accumulation, the wall-clock budget, checkpoints (model + optimizer + step; the
data position follows from the step) and validation loss / bits per byte. Knows nothing of
text: it reads the uint16 streams and meta.json that data.py and the tokenize stage wrote.

GPU recipe: fp32 weights + bf16 autocast, SDPA attention, torch.compile of the loss, fused
AdamW, TF32. On CPU (tests) the same loop runs in fp32 without compile.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from editkv.engine.training.bpe import EOT_ID
from editkv.engine.training.data import PackedStreams, eval_windows
from transformers import LlamaConfig, LlamaForCausalLM

Log = Callable[[str], None]


@dataclass(frozen=True)
class ModelSize:
    """Shape of the Llama decoder (defaults: the shipped ~23.7M-parameter model)."""

    # 15360 x 512 bf16 embeddings = 15.7 MB: the tied embedding fits one <= 16 MB shard.
    vocab_size: int = 15360
    hidden_size: int = 512
    intermediate_size: int = 1152
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 64
    max_positions: int = 4096


TINY_SIZE = ModelSize(512, 64, 128, 2, 4, 2, 16, 256)


def llama_config(size: ModelSize) -> LlamaConfig:
    """The transformers config of `size` (tied embeddings, RoPE theta 1e5, eos = pad = 0)."""
    config = LlamaConfig(
        vocab_size=size.vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        head_dim=size.head_dim,
        max_position_embeddings=size.max_positions,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=EOT_ID,
        pad_token_id=EOT_ID,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )
    config._attn_implementation = "sdpa"
    return config


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping knobs; `total_steps` or `train_minutes` sets the length."""

    seq_len: int = 4096
    micro_batch: int = 16
    batch_tokens: int = 262144
    total_steps: int | None = None  # schedule length
    train_minutes: float | None = None  # else: size the schedule to this much training time
    peak_lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    rewarmup_steps: int = 50  # after --init-from (fresh optimizer moments)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 250
    ckpt_every: int = 100
    eval_tokens: int = 2_000_000
    seed: int = 0
    device: str = "cuda"
    compile: bool = True

    @property
    def accum_steps(self) -> int:
        return max(1, self.batch_tokens // (self.micro_batch * self.seq_len))

    @property
    def tokens_per_step(self) -> int:
        return self.accum_steps * self.micro_batch * self.seq_len


def lr_at(step: int, total_steps: int | None, cfg: TrainConfig, rewarmup_from: int | None) -> float:
    """Learning rate of optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        lr = cfg.peak_lr * (step + 1) / cfg.warmup_steps
    elif total_steps is None:
        lr = cfg.peak_lr  # the schedule length is being measured (within warmup in practice)
    else:
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        floor = cfg.min_lr_ratio
        lr = cfg.peak_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    if rewarmup_from is not None:
        lr *= min(1.0, (step - rewarmup_from + 1) / max(1, cfg.rewarmup_steps))
    return lr


class _LMLoss(torch.nn.Module):
    """Mean next-token cross-entropy of a batch of windows (compiled as one graph)."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # [B, S] x2 -> []
        logits = self.model(input_ids=x, use_cache=False).logits  # [B, S, V]
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


class _CompiledLoss:
    """`torch.compile`d loss that falls back to eager, once, if compiling fails."""

    def __init__(self, model: LlamaForCausalLM, compile_: bool, log: Log) -> None:
        self.eager = _LMLoss(model)
        self.fn = torch.compile(self.eager) if compile_ else self.eager
        self.log = log

    @property
    def compiling(self) -> bool:
        return self.fn is not self.eager

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        try:
            return self.fn(x, y)
        except Exception as err:  # inductor/dynamo raise many types
            if self.fn is self.eager:
                raise
            self.log(f"torch.compile failed ({type(err).__name__}: {str(err)[:300]}); going eager")
            self.fn = self.eager
            return self.fn(x, y)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: LlamaForCausalLM, path: Path, cfg: TrainConfig, token_bytes: torch.Tensor
) -> dict:
    """Mean loss (nats/token) and bits per UTF-8 byte over the start of a stream."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    byte_loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    num_tokens, num_bytes = 0, 0
    for rows in eval_windows(path, cfg.seq_len, cfg.micro_batch, cfg.eval_tokens):
        ids = torch.from_numpy(rows).to(device)  # [b, s + 1]
        x, y = ids[:, :-1], ids[:, 1:].flatten()
        with _autocast(device):
            logits = model(input_ids=x, use_cache=False).logits  # [b, s, V]
        losses = F.cross_entropy(logits.float().flatten(0, 1), y, reduction="none")  # [b*s]
        nbytes = token_bytes[y]  # control tokens stand for no text: left out of bits per byte
        loss_sum += losses.sum()
        byte_loss_sum += (losses * (nbytes > 0)).sum()
        num_tokens += y.numel()
        num_bytes += int(nbytes.sum())
    model.train(was_training)
    if num_tokens == 0:
        return {"loss": float("nan"), "bpb": float("nan"), "tokens": 0}
    return {
        "loss": loss_sum.item() / num_tokens,
        "bpb": byte_loss_sum.item() / math.log(2) / max(num_bytes, 1),
        "tokens": num_tokens,
    }


def build_model(size: ModelSize, device: torch.device, seed: int) -> LlamaForCausalLM:
    """A freshly initialised fp32 model on `device` (the seed fixes the init)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(size)).to(device)


def _optimizer(model: LlamaForCausalLM, cfg: TrainConfig, device: torch.device):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},  # norms
    ]
    return torch.optim.AdamW(groups, lr=cfg.peak_lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=device.type == "cuda")


def _save_checkpoint(path: Path, model, optimizer, state: dict, size: ModelSize) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "state": state, "size": asdict(size), "rng": rng}, tmp)
    tmp.replace(path)


def _load_checkpoint(path: Path, model, optimizer, state: dict, size: ModelSize) -> None:
    device = next(model.parameters()).device
    ckpt = torch.load(path, map_location=device, weights_only=False)
    if ckpt["size"] != asdict(size):
        raise ValueError(f"checkpoint {path} is a {ckpt['size']} model, not {asdict(size)}; "
                         "pass the sizes it was trained with")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    state.update(ckpt["state"])
    torch.set_rng_state(ckpt["rng"]["torch"].cpu())  # map_location may have moved it
    if "cuda" in ckpt["rng"] and device.type == "cuda":
        torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng"]["cuda"]])


def _load_init_weights(model: LlamaForCausalLM, folder: Path, state: dict, log: Log) -> None:
    """Weights of an exported folder; step and schedule from its training_stats.json."""
    loaded = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    stats_file = folder / "training_stats.json"
    if stats_file.is_file():
        stats = json.loads(stats_file.read_text())
        state["step"] = int(stats["steps"])
        state["total_steps"] = stats.get("total_steps")
        state["tokens_seen"] = int(stats.get("tokens_seen", 0))
        state["train_seconds"] = float(stats.get("train_seconds", 0.0))
        state["wall_seconds"] = float(stats.get("wall_seconds_total", 0.0))
    state["rewarmup_from"] = state["step"]
    log(f"init-from {folder}: weights loaded, continuing at step {state['step']} "
        f"with a fresh optimizer ({state['total_steps']} steps in the schedule)")


def _seconds_to_finish(
    step_times: list[float], eval_seconds: float | None, ckpt_seconds: float, compiling: bool,
    cfg: TrainConfig,
) -> float:
    """Wall time one more step, the final evaluation and the checkpoint may take."""
    steady = step_times[1:]  # this run's first step compiles (about a minute on a GPU)
    if steady:
        next_step = max(steady[-3:])
    elif step_times:
        next_step = min(step_times[0], 10.0)
    else:
        next_step = 60.0 if compiling else 1.0
    if eval_seconds is None:  # forward passes over three validation streams
        eval_seconds = (1.0 + max(steady[-3:]) * 3 * cfg.eval_tokens / cfg.tokens_per_step / 3
                        if steady else (20.0 if compiling else 2.0))
    return next_step + eval_seconds + ckpt_seconds + 2.0


def train(
    cfg: TrainConfig,
    size: ModelSize,
    data_dir: Path,
    ckpt_path: Path,
    log: Log,
    *,
    resume: bool = False,
    init_from: Path | None = None,
    deadline: float | None = None,
    stop_at_step: int | None = None,
) -> tuple[LlamaForCausalLM, dict]:
    """Train until the schedule ends, `deadline` (time.monotonic) nears or `stop_at_step`.

    Returns the model and its stats. Always leaves a checkpoint at `ckpt_path` that
    `resume=True` continues from, exactly: same data order, same optimizer state.
    """
    run_started = time.monotonic()
    device = torch.device(cfg.device)
    torch.set_float32_matmul_precision("high")
    meta = json.loads((data_dir / "meta.json").read_text())
    if meta["vocab_size"] > size.vocab_size:
        raise ValueError(f"tokenizer has {meta['vocab_size']} ids, model only {size.vocab_size}")
    data = PackedStreams([data_dir / s["path"] for s in meta["train_streams"]],
                         cfg.seq_len, cfg.seed)
    token_bytes = torch.from_numpy(np.load(data_dir / "token_bytes.npy")).to(device)

    model = build_model(size, device, cfg.seed)
    state = {"step": 0, "total_steps": cfg.total_steps, "tokens_seen": 0, "train_seconds": 0.0,
             "wall_seconds": 0.0, "rewarmup_from": None}
    optimizer = _optimizer(model, cfg, device)
    if resume:
        _load_checkpoint(ckpt_path, model, optimizer, state, size)
        if cfg.total_steps is not None and cfg.total_steps != state["total_steps"]:
            log(f"schedule length changed: {state['total_steps']} -> {cfg.total_steps} steps")
            state["total_steps"] = cfg.total_steps
        log(f"resumed from {ckpt_path} at step {state['step']}")
    elif init_from is not None:
        _load_init_weights(model, init_from, state, log)
        if cfg.total_steps is not None:
            state["total_steps"] = cfg.total_steps
    if state["total_steps"] is None and cfg.train_minutes is None:
        raise ValueError("the schedule needs a length: pass --total-steps or --train-minutes")

    loss_fn = _CompiledLoss(model, cfg.compile and device.type == "cuda", log)
    num_params = sum(p.numel() for p in model.parameters())
    log(f"model {num_params / 1e6:.2f}M params ({asdict(size)}); {cfg.accum_steps} x "
        f"{cfg.micro_batch} x {cfg.seq_len} = {cfg.tokens_per_step} tokens/step; "
        f"{data.num_windows} windows/epoch in {len(data.streams)} stream(s); "
        f"schedule {state['total_steps'] or f'sized to {cfg.train_minutes} min'}")

    step_times: list[float] = []
    ckpt_seconds, eval_seconds = 2.0, None
    loss_acc = torch.zeros((), device=device)
    interval_start, interval_steps = time.monotonic(), 0
    last_eval: dict = {}
    stop_reason = "schedule done"

    def save() -> None:
        nonlocal ckpt_seconds
        t = time.monotonic()
        _save_checkpoint(ckpt_path, model, optimizer, state, size)
        ckpt_seconds = time.monotonic() - t

    def run_eval() -> dict:
        nonlocal eval_seconds
        t = time.monotonic()
        result = {"step": state["step"],
                  "val": evaluate(model, data_dir / "val.bin", cfg, token_bytes)}
        for name in ("val_fim", "val_line_fim"):
            if (data_dir / f"{name}.bin").is_file():
                result[name] = evaluate(model, data_dir / f"{name}.bin", cfg, token_bytes)
        eval_seconds = time.monotonic() - t
        log(f"eval step {state['step']}: val loss {result['val']['loss']:.4f} "
            f"bpb {result['val']['bpb']:.4f}"
            + (f", fim val loss {result['val_fim']['loss']:.4f}" if "val_fim" in result else "")
            + (f", line-fim val loss {result['val_line_fim']['loss']:.4f}"
               if "val_line_fim" in result else "")
            + f" ({eval_seconds:.1f}s)")
        return result

    model.train()
    while state["total_steps"] is None or state["step"] < state["total_steps"]:
        if stop_at_step is not None and state["step"] >= stop_at_step:
            stop_reason = f"stop at step {stop_at_step}"
            break
        if deadline is not None and time.monotonic() + _seconds_to_finish(
            step_times, eval_seconds, ckpt_seconds, loss_fn.compiling, cfg
        ) > deadline:
            stop_reason = "time budget"
            break
        step = state["step"]
        lr = lr_at(step, state["total_steps"], cfg, state["rewarmup_from"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.monotonic()
        first = step * cfg.accum_steps * cfg.micro_batch
        for micro in range(cfg.accum_steps):
            rows = torch.from_numpy(data.batch(first + micro * cfg.micro_batch, cfg.micro_batch))
            if device.type == "cuda":
                rows = rows.pin_memory().to(device, non_blocking=True)
            x, y = rows[:, :-1], rows[:, 1:]  # [b, s] each
            with _autocast(device):
                loss = loss_fn(x, y)
            (loss / cfg.accum_steps).backward()
            loss_acc += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.monotonic() - t0
        step_times.append(dt)
        state["step"] = step + 1
        state["tokens_seen"] += cfg.tokens_per_step
        state["train_seconds"] += dt
        interval_steps += 1

        if state["total_steps"] is None and len(step_times) >= 13:
            typical = statistics.median(step_times[3:])  # the first steps compile
            left = cfg.train_minutes * 60 - state["train_seconds"]
            state["total_steps"] = max(state["step"] + 1, state["step"] + int(left / typical))
            log(f"schedule sized: {typical:.3f}s/step, {cfg.train_minutes} min -> "
                f"{state['total_steps']} steps")

        done = state["step"] == state["total_steps"]
        if state["step"] % cfg.log_every == 0 or done:
            elapsed = time.monotonic() - interval_start
            tok_s = interval_steps * cfg.tokens_per_step / max(elapsed, 1e-9)
            log(f"step {state['step']}/{state['total_steps']} loss "
                f"{loss_acc.item() / (interval_steps * cfg.accum_steps):.4f} lr {lr:.2e} "
                f"gnorm {grad_norm.item():.3f} {tok_s:,.0f} tok/s "
                f"({time.monotonic() - run_started:.0f}s)")
            state["last_train_loss"] = loss_acc.item() / (interval_steps * cfg.accum_steps)
            state["tokens_per_s"] = tok_s
            loss_acc.zero_()
            interval_start, interval_steps = time.monotonic(), 0
        if state["step"] % cfg.eval_every == 0 and not done:
            last_eval = run_eval()
            interval_start = time.monotonic()
        if state["step"] % cfg.ckpt_every == 0 and not done:
            save()
            interval_start = time.monotonic()

    if interval_steps:
        state["last_train_loss"] = loss_acc.item() / (interval_steps * cfg.accum_steps)
    if state["step"] > 0 and (not last_eval or last_eval.get("step") != state["step"]):
        last_eval = run_eval()
    run_seconds = time.monotonic() - run_started
    state["wall_seconds"] += run_seconds
    save()
    measured = step_times[3:] or step_times
    stats = {
        "steps": state["step"],
        "total_steps": state["total_steps"],
        "stopped": stop_reason,
        "tokens_seen": state["tokens_seen"],
        "tokens_per_step": cfg.tokens_per_step,
        "train_loss": state.get("last_train_loss"),
        "val_loss": last_eval.get("val", {}).get("loss"),
        "val_bits_per_byte": last_eval.get("val", {}).get("bpb"),
        "val_fim_loss": last_eval.get("val_fim", {}).get("loss"),
        "val_line_fim_loss": last_eval.get("val_line_fim", {}).get("loss"),
        "train_seconds": round(state["train_seconds"], 1),
        "run_wall_seconds": round(run_seconds, 1),
        "wall_seconds_total": round(state["wall_seconds"], 1),
        "tokens_per_s": round(cfg.tokens_per_step * len(measured) / max(sum(measured), 1e-9)),
        "params": num_params,
        "model_size": asdict(size),
        "train_config": asdict(cfg),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    log(f"training stopped ({stop_reason}) at step {state['step']}: {json.dumps(stats)}")
    return model, stats
