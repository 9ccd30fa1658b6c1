"""A MaskSAM-style prompt generator on a frozen ``segment_anything`` SAM (docs/method.md#prompt-generator).

The generator reads SAM's image encoder at four levels through forward hooks (the blocks at 1/4, 1/2 and
3/4 depth and the neck output; no fork of ``segment_anything``), fuses them, upsamples with transposed
convolutions to N auxiliary mask logits at SAM's mask-prompt size (4x the embedding grid), and pools
each mask's features into a query vector that gives a box (cx, cy, w, h, normalised to the original
image) and class logits (K classes + "no object"). Each query's box and mask are prompts for SAM's frozen
prompt encoder and mask decoder, which return the final mask logits.

Optional lightweight adapters (bottleneck MLPs, zero-initialised so the frozen SAM is unchanged at
step 0) sit after encoder blocks and after the mask decoder's two-way transformer layers; they are
plain modules attached through forward hooks. SAM's own weights are never trained.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert

PromptKind = Literal["box+mask", "box", "mask"]


@dataclass
class PromptFreeConfig:
    """Architecture of the generator and its adapters (saved next to the weights)."""

    num_queries: int = 4
    num_classes: int = 1
    hidden_dim: int = 64
    prompts: PromptKind = "box+mask"
    level_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    encoder_adapters: bool = False
    decoder_adapters: bool = True
    adapter_dim: int = 16
    sam: str = "tiny"
    sam_checkpoint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["level_fractions"] = list(self.level_fractions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptFreeConfig:
        d = dict(d)
        d["level_fractions"] = tuple(d.get("level_fractions", (0.25, 0.5, 0.75)))
        return cls(**d)


def level_indices(depth: int, fractions: tuple[float, ...]) -> list[int]:
    """0-based encoder block index at each depth fraction (the block that ends that fraction of depth)."""
    return [max(1, round(depth * f)) - 1 for f in fractions]


class Adapter(nn.Module):
    """x + up(GELU(down(x))) over the last dimension; ``up`` starts at zero (identity at init)."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.gelu(self.down(x)))


class Generator(nn.Module):
    """Features (3 block levels + neck) -> aux mask logits, boxes, class logits for N queries."""

    def __init__(self, encoder_dim: int, neck_dim: int, upsample: int, cfg: PromptFreeConfig) -> None:
        super().__init__()
        h, n = cfg.hidden_dim, cfg.num_queries
        levels = len(cfg.level_fractions)
        self.block_proj = nn.ModuleList(nn.Conv2d(encoder_dim, h, 1) for _ in range(levels))
        self.neck_proj = nn.Conv2d(neck_dim, h, 1)
        self.fuse = nn.Sequential(nn.Conv2d(h * (levels + 1), h, 3, padding=1), nn.GroupNorm(_groups(h), h), nn.GELU())
        stages, ch = [], h
        for _ in range(int(round(math.log2(upsample)))):  # transposed convolutions up to the mask-prompt size
            out = max(ch // 2, 8)
            stages += [nn.ConvTranspose2d(ch, out, 2, stride=2), nn.GroupNorm(_groups(out), out), nn.GELU()]
            ch = out
        self.up = nn.Sequential(*stages)
        self.mask_head = nn.Conv2d(ch, n, 1)
        nn.init.constant_(self.mask_head.bias, -2.0)  # start mostly background (lesions are small)
        self.query_embed = nn.Parameter(torch.randn(n, h) * 0.02)
        self.query_mlp = nn.Sequential(nn.Linear(h + 2, h), nn.GELU(), nn.Linear(h, h), nn.GELU())
        self.class_head = nn.Linear(h, cfg.num_classes + 1)
        self.box_head = nn.Linear(h, 4)
        nn.init.zeros_(self.box_head.weight)  # boxes start as the moments of the aux masks
        nn.init.zeros_(self.box_head.bias)

    def forward(self, blocks: list[torch.Tensor], neck: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """``blocks``: (B, h, w, C) encoder outputs; ``neck``: (B, C', h, w); ``valid``: (B, 1, L, L) 0/1 mask
        of the non-padded region in the mask frame. Returns ``aux_masks`` (B, N, L, L) logits, ``boxes``
        (B, N, 4) cx, cy, w, h in [0, 1] of the original image, ``logits`` (B, N, K + 1)."""
        feats = [p(b.permute(0, 3, 1, 2)) for p, b in zip(self.block_proj, blocks)] + [self.neck_proj(neck)]
        fused = self.fuse(torch.cat(feats, 1))  # (B, h, eh, ew)
        aux = self.mask_head(self.up(fused))  # (B, N, L, L)
        prob = torch.sigmoid(aux) * valid
        # mask-weighted pooling of the fused features, one vector per query
        weights = F.adaptive_avg_pool2d(prob, fused.shape[-2:])  # (B, N, eh, ew)
        mass = weights.flatten(2).sum(-1, keepdim=True)  # (B, N, 1)
        pooled = torch.einsum("bnhw,bchw->bnc", weights, fused) / (mass + 1e-6)
        area = prob.flatten(2).sum(-1) / valid.flatten(2).sum(-1).clamp(min=1)  # (B, N)
        peak = prob.flatten(2).amax(-1)
        q = self.query_mlp(torch.cat([pooled + self.query_embed, torch.log(area + 1e-6)[..., None], peak[..., None]], -1))
        moments = moment_boxes(prob, valid)
        boxes = torch.sigmoid(torch.logit(moments.clamp(1e-4, 1 - 1e-4)) + self.box_head(q))
        return {"aux_masks": aux, "boxes": boxes, "logits": self.class_head(q)}


def _groups(ch: int) -> int:
    return next(g for g in (8, 4, 2, 1) if ch % g == 0)


def moment_boxes(prob: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, N, L, L) soft masks -> (B, N, 4) cx, cy, w, h normalised to the valid region (w = sqrt(12 var))."""
    hgt, wid = prob.shape[-2:]
    vh = valid[:, 0].amax(2).sum(1).clamp(min=1)  # valid rows / columns per image
    vw = valid[:, 0].amax(1).sum(1).clamp(min=1)
    ys = (torch.arange(hgt, device=prob.device, dtype=prob.dtype) + 0.5)[None] / vh[:, None]  # (B, L)
    xs = (torch.arange(wid, device=prob.device, dtype=prob.dtype) + 0.5)[None] / vw[:, None]
    mass = prob.sum((2, 3)) + 1e-6
    py, px = prob.sum(3), prob.sum(2)  # (B, N, L) marginals
    my = (py * ys[:, None]).sum(-1) / mass
    mx = (px * xs[:, None]).sum(-1) / mass
    vy = (py * ys[:, None] ** 2).sum(-1) / mass - my**2
    vx = (px * xs[:, None] ** 2).sum(-1) / mass - mx**2
    w = torch.sqrt((12 * vx).clamp(min=1e-8))
    h = torch.sqrt((12 * vy).clamp(min=1e-8))
    return torch.stack([mx, my, w, h], -1).clamp(0, 1)


class PromptSAM(nn.Module):
    """Frozen SAM + prompt generator + optional adapters; ``forward`` runs prompt-free segmentation.

    Inputs are SAM-preprocessed images (B, 3, S, S) and their resized sizes (h', w') before padding.
    The hooks live on the SAM module: a SAM serves one ``PromptSAM`` at a time (building a new one
    detaches the previous; ``remove_hooks`` detaches explicitly).
    """

    def __init__(self, sam: nn.Module, cfg: PromptFreeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.sam = sam
        for p in sam.parameters():
            p.requires_grad_(False)
        sam.eval()
        enc = sam.image_encoder
        self.levels = level_indices(len(enc.blocks), cfg.level_fractions)
        encoder_dim = enc.patch_embed.proj.out_channels
        emb = sam.prompt_encoder.image_embedding_size
        self.mask_size = tuple(sam.prompt_encoder.mask_input_size)
        self.generator = Generator(encoder_dim, sam.prompt_encoder.embed_dim, self.mask_size[0] // emb[0], cfg)
        self.encoder_adapters = nn.ModuleDict(
            {str(i): Adapter(encoder_dim, cfg.adapter_dim) for i in range(len(enc.blocks))} if cfg.encoder_adapters
            else {})
        layers = sam.mask_decoder.transformer.layers
        self.decoder_adapters = nn.ModuleDict(
            {str(i): Adapter(sam.mask_decoder.transformer_dim, cfg.adapter_dim) for i in range(len(layers))}
            if cfg.decoder_adapters else {})
        self._captured: dict[str, torch.Tensor] = {}
        for handle in getattr(sam, "_prompt_generator_hooks", []):  # one generator per SAM: the newest wins
            handle.remove()
        self._hooks: list = []
        sam._prompt_generator_hooks = self._hooks
        for i, blk in enumerate(enc.blocks):  # adapter first: the capture hook then sees the adapted output
            if str(i) in self.encoder_adapters:
                self._hooks.append(blk.register_forward_hook(self._encoder_adapter_hook(str(i))))
        for k, i in enumerate(self.levels):
            self._hooks.append(enc.blocks[i].register_forward_hook(self._capture_hook(f"level{k}")))
        self._hooks.append(enc.neck.register_forward_hook(self._capture_hook("neck")))
        for i, layer in enumerate(layers):
            if str(i) in self.decoder_adapters:
                self._hooks.append(layer.register_forward_hook(self._decoder_adapter_hook(str(i))))

    # -- hooks ------------------------------------------------------------------------------------
    def _capture_hook(self, name: str):
        def hook(module, args, output):
            self._captured[name] = output

        return hook

    def _encoder_adapter_hook(self, key: str):
        def hook(module, args, output):
            return self.encoder_adapters[key](output)

        return hook

    def _decoder_adapter_hook(self, key: str):
        def hook(module, args, output):
            queries, keys = output
            return self.decoder_adapters[key](queries), keys

        return hook

    def remove_hooks(self) -> None:
        """Detach from SAM (its forward is plain SAM again); this object stops working."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def train(self, mode: bool = True) -> PromptSAM:
        super().train(mode)
        self.sam.eval()  # frozen: no dropout / norm statistics updates
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The generator and adapters (SAM's weights are not saved: they are the frozen base)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("sam.")}

    # -- forward ----------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> dict[str, Any]:
        """Run SAM's image encoder once; returns the hooked ``blocks`` and ``neck`` features."""
        self._captured.clear()
        neck = self.sam.image_encoder(images)
        blocks = [self._captured[f"level{k}"] for k in range(len(self.levels))]
        self._captured.clear()
        return {"blocks": blocks, "neck": neck}

    def valid_mask(self, input_hw: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(B, 1, L, L) 1 inside the resized image, 0 on SAM's padding (mask frame)."""
        size = self.sam.image_encoder.img_size
        hgt, wid = self.mask_size
        ys = torch.arange(hgt, device=device)[None, :, None]
        xs = torch.arange(wid, device=device)[None, None, :]
        lim = (input_hw.to(device).float() * hgt / size).ceil().long()  # (B, 2)
        return ((ys < lim[:, 0, None, None]) & (xs < lim[:, 1, None, None])).float()[:, None]

    def forward(self, images: torch.Tensor | None = None, input_hw: torch.Tensor | None = None,
                features: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """Prompt-free prediction: ``aux_masks`` and ``masks`` (B, N, L, L) logits in the padded mask frame,
        ``boxes`` (B, N, 4), ``logits`` (B, N, K + 1), ``iou`` (B, N). Pass ``images`` or cached ``features``
        (only valid without encoder adapters)."""
        if features is None:
            if self.cfg.encoder_adapters:
                features = self.encode(images)
            else:
                with torch.no_grad():
                    features = self.encode(images)
        neck = features["neck"]
        valid = self.valid_mask(input_hw, neck.device)
        out = self.generator(features["blocks"], neck, valid)
        size = self.sam.image_encoder.img_size
        pe = self.sam.prompt_encoder.get_dense_pe()
        masks, ious = [], []
        for b in range(neck.shape[0]):
            boxes = masks_in = None
            if "box" in self.cfg.prompts:
                scale = input_hw[b].flip(0).to(neck).repeat(2)  # (w', h', w', h')
                boxes = box_convert(out["boxes"][b], "cxcywh", "xyxy") * scale
                boxes = boxes.clamp(0, size)
            if "mask" in self.cfg.prompts:
                masks_in = out["aux_masks"][b][:, None]
            sparse, dense = self.sam.prompt_encoder(points=None, boxes=boxes, masks=masks_in)
            low, iou = self.sam.mask_decoder(image_embeddings=neck[b:b + 1], image_pe=pe,
                                             sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                             multimask_output=False)
            masks.append(low[:, 0])
            ious.append(iou[:, 0])
        out["masks"] = torch.stack(masks) * valid - 20.0 * (1 - valid)  # padding is background
        out["iou"] = torch.stack(ious)
        return out
