"""The study's CRNN: convolution blocks -> reshape + LSTM -> linear head.

Every size comes from :class:`ModelConfig` or is computed from it (fmnist_crnn.architecture,
without torch); a configuration that cannot build fails in ``plan`` with the parameters and
sizes that do not fit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fmnist_crnn.architecture import plan
from fmnist_crnn.config import ModelConfig, model_config_from_dict, section_dict
from fmnist_crnn.errors import CheckpointError
from fmnist_crnn.files import atomic_torch_save


class CRNN(nn.Module):
    """Input: float images (B, in_channels, H, W) scaled to [0, 1]. Output: logits (B, classes)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.plan = plan(cfg)
        self.register_buffer("mean", torch.tensor(cfg.input_mean))
        self.register_buffer("std", torch.tensor(cfg.input_std))

        blocks = []
        in_ch = cfg.in_channels
        for c, k, s, p, pool, drop in zip(cfg.channels, cfg.kernel_sizes, cfg.strides,
                                          cfg.paddings, cfg.pool, cfg.dropout, strict=True):
            layers: list[nn.Module] = [
                nn.Conv2d(in_ch, c, kernel_size=k, stride=s, padding=p),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.Dropout(drop),
            ]
            if pool:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            blocks.append(nn.Sequential(*layers))
            in_ch = c
        self.blocks = nn.ModuleList(blocks)
        # No parameters when off, so the default model's weights and their init are unchanged.
        self.projection = (nn.Linear(self.plan.step_size, cfg.projection_dim)
                           if cfg.projection_dim else nn.Identity())
        self.lstm = nn.LSTM(cfg.projection_dim or self.plan.step_size, cfg.hidden_dim,
                            num_layers=cfg.num_layers,
                            batch_first=True, bidirectional=cfg.bidirectional)
        head: list[nn.Module] = [nn.Flatten()]
        width = self.plan.head_in
        for i, dim in enumerate(cfg.head_dims):
            head += [nn.Linear(width, dim), nn.ReLU(inplace=True)]
            if i == len(cfg.head_dims) - 1 and cfg.head_dropout > 0:
                head.append(nn.Dropout(cfg.head_dropout))
            width = dim
        head.append(nn.Linear(width, cfg.num_classes))
        self.head = nn.Sequential(*head)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] as the first conv block sees them."""
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalise, then the conv blocks; returns each block's output (B, C_i, H_i, W_i)."""
        x = self.normalise(x)
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs

    def sequence(self, fmap: torch.Tensor) -> torch.Tensor:
        b = fmap.shape[0]
        if self.cfg.sequence == "rows":  # (B, C, H, W) -> (B, H, C*W)
            fmap = fmap.permute(0, 2, 1, 3)
        elif self.cfg.sequence == "columns":  # (B, C, H, W) -> (B, W, C*H)
            fmap = fmap.permute(0, 3, 1, 2)
        # "chunk", the study's reshape: (B, C, H, W) -> (B, C*H*W / E, E)
        seq = fmap.reshape(b, self.plan.seq_len, self.plan.step_size)
        out, _ = self.lstm(self.projection(seq))  # (B, T, step) -> (B, T, hidden * directions)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.sequence(self.features(x)[-1]))  # (B, T, hidden) -> (B, classes)


def shape_table(cfg: ModelConfig, batch_size: int = 64) -> list[tuple[str, list[int]]]:
    """Each stage's output shape, computed by running the model on zeros."""
    model = CRNN(cfg).eval()
    x = torch.zeros(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size)
    rows = [("input", list(x.shape))]
    with torch.no_grad():
        fmaps = model.features(x)
        rows += [(f"block{i + 1}", list(f.shape)) for i, f in enumerate(fmaps)]
        seq = model.sequence(fmaps[-1])
        rows.append(("lstm", list(seq.shape)))
        rows.append(("head", list(model.head(seq).shape)))
    return rows


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# The model file: the weights and the model config that rebuilds them (nanoGPT's model_args),
# so evaluation, inspection and prediction never need the training parameters.


def save_model(model: CRNN, path: str | Path) -> None:
    """Write the model file atomically: {"model_config": ..., "state_dict": ...} on the CPU."""
    atomic_torch_save({"model_config": section_dict(model.cfg),
                       "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}, path)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> CRNN:
    """Rebuild the model from its file (``weights_only``: nothing in it is executed)."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: model file not found; run the train stage") from None
    except Exception as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: not a readable model checkpoint ({detail})") from None
    if not isinstance(blob, dict) or not {"model_config", "state_dict"} <= set(blob):
        raise CheckpointError(f"{path}: expected keys 'model_config' and 'state_dict'")
    model = CRNN(model_config_from_dict(blob["model_config"]))
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the architecture in its own "
                              f"model_config: {exc}") from None
    return model.to(device)
