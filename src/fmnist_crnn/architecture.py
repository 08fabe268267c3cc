"""The CRNN's sizes from its configuration, without torch: the validate stage checks an
architecture here before any stage runs, and fmnist_crnn.model builds the network from the
same plan."""

from __future__ import annotations

from dataclasses import dataclass

from fmnist_crnn.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class Plan:
    """Sizes derived from a configuration: per-block (C, H, W) and the sequence shape."""

    block_shapes: tuple[tuple[int, int, int], ...]
    seq_len: int
    step_size: int  # the LSTM's input size
    head_in: int


def plan(cfg: ModelConfig) -> Plan:
    """Work out every size, or raise ConfigError naming the parameters that do not fit."""
    h = w = cfg.image_size
    shapes = []
    for i, (c, k, s, p, pool) in enumerate(
        zip(cfg.channels, cfg.kernel_sizes, cfg.strides, cfg.paddings, cfg.pool, strict=True)
    ):
        conv_h = (h + 2 * p - k) // s + 1
        if conv_h < 1:
            raise ConfigError(
                f"conv block {i + 1} has no pixels left: input {h}x{w}, model.kernel_sizes[{i}]="
                f"{k}, padding {p}, model.strides[{i}]={s} give {conv_h}x{conv_h}. Use a smaller "
                "kernel or stride, more padding, or fewer blocks."
            )
        h = w = conv_h // 2 if pool else conv_h
        if h < 1:
            raise ConfigError(
                f"conv block {i + 1} has no pixels left after pooling: conv output "
                f"{conv_h}x{conv_h}, model.pool[{i}]=true halves it to {h}x{w}. Turn off pooling "
                "in this block or keep more resolution earlier."
            )
        shapes.append((c, h, w))
    c, h, w = shapes[-1]
    if cfg.sequence == "rows":
        seq_len, step = h, c * w
    elif cfg.sequence == "columns":
        seq_len, step = w, c * h
    else:
        flat = c * h * w
        if flat % cfg.embedding_dim:
            raise ConfigError(
                f"the last conv block outputs C*H*W = {c}*{h}*{w} = {flat} features, which "
                f"model.embedding_dim={cfg.embedding_dim} does not divide; choose an "
                f"embedding_dim that divides {flat}, or another model.sequence."
            )
        seq_len, step = flat // cfg.embedding_dim, cfg.embedding_dim
    directions = 2 if cfg.bidirectional else 1
    return Plan(tuple(shapes), seq_len, step, seq_len * cfg.hidden_dim * directions)
