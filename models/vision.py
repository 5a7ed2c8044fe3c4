"""The Llama 4 vision tower and projector in plain PyTorch, as transformers 5.24's Llama4VisionModel and
Llama4MultiModalProjector compute them, with real arithmetic (no complex numbers) so the graph can be exported.

Parameter names equal transformers' own, so the `vision_model.*` and `multi_modal_projector.*` tensors of a
Llama4ForConditionalGeneration checkpoint load with their prefix stripped (`load_vision_state`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moec.common.errors import MoecError


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    rope_theta: float
    pixel_shuffle_ratio: float
    projector_input_dim: int
    projector_output_dim: int
    vision_output_dim: int
    text_hidden_size: int
    norm_eps: float = 1e-5

    @classmethod
    def from_hf_dict(cls, config: dict) -> "VisionConfig":
        """From a ConditionalGeneration config.json's dict (its `vision_config` and `text_config`)."""
        vision, text = config.get("vision_config"), config.get("text_config")
        if not vision or not text:
            raise MoecError("config.json has no vision_config/text_config: the checkpoint is text-only")
        rope = vision.get("rope_parameters") or {}
        return cls(
            hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
            num_hidden_layers=vision["num_hidden_layers"], num_attention_heads=vision["num_attention_heads"],
            num_channels=vision.get("num_channels", 3), image_size=vision["image_size"],
            patch_size=vision["patch_size"], rope_theta=float(rope.get("rope_theta", vision.get("rope_theta", 10000))),
            pixel_shuffle_ratio=vision["pixel_shuffle_ratio"], projector_input_dim=vision["projector_input_dim"],
            projector_output_dim=vision["projector_output_dim"], vision_output_dim=vision["vision_output_dim"],
            text_hidden_size=text["hidden_size"], norm_eps=vision.get("norm_eps", 1e-5),
        )


def rotary_cos_sin(config: VisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """2D (axial) rotary angles per position, [patches + 1, head_dim // 2]; the class token (last) gets angle 0."""
    side = config.image_size // config.patch_size
    idx = torch.arange(side * side, dtype=torch.int64)
    freq_dim = config.hidden_size // config.num_attention_heads // 2
    rope_freq = 1.0 / (config.rope_theta ** (torch.arange(0, freq_dim, 2)[: freq_dim // 2].float() / freq_dim))
    # transformers interleaves x and y, repeats each frequency twice and then keeps every other one: x then y halves.
    freqs_x = ((idx % side + 1)[:, None] * rope_freq[None, :])
    freqs_y = ((idx // side + 1)[:, None] * rope_freq[None, :])
    angles_PD = torch.cat([freqs_x, freqs_y], dim=-1)
    angles_PD = torch.cat([angles_PD, torch.zeros_like(angles_PD[:1])], dim=0)
    return torch.cos(angles_PD), torch.sin(angles_PD)


def _rotate_pairs(x_BPNK: torch.Tensor, cos_PD: torch.Tensor, sin_PD: torch.Tensor) -> torch.Tensor:
    # Adjacent pairs (x0, x1) are one complex number in transformers' formulation.
    pairs = x_BPNK.float().reshape(*x_BPNK.shape[:-1], -1, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    cos, sin = cos_PD[None, :, None, :], sin_PD[None, :, None, :]
    out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1)
    return out.flatten(-2).type_as(x_BPNK)


class _Attention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // config.num_attention_heads
        self.q_proj = nn.Linear(hidden, hidden, bias=True)
        self.k_proj = nn.Linear(hidden, hidden, bias=True)
        self.v_proj = nn.Linear(hidden, hidden, bias=True)
        self.o_proj = nn.Linear(hidden, hidden, bias=True)

    def forward(self, x_BPH: torch.Tensor, cos_PD: torch.Tensor, sin_PD: torch.Tensor) -> torch.Tensor:
        b, p, _ = x_BPH.shape
        q_BPNK = self.q_proj(x_BPH).view(b, p, self.num_heads, self.head_dim)
        k_BPNK = self.k_proj(x_BPH).view(b, p, self.num_heads, self.head_dim)
        v_BPNK = self.v_proj(x_BPH).view(b, p, self.num_heads, self.head_dim)
        q_BPNK, k_BPNK = _rotate_pairs(q_BPNK, cos_PD, sin_PD), _rotate_pairs(k_BPNK, cos_PD, sin_PD)
        q_BNPK, k_BNPK, v_BNPK = (t.transpose(1, 2) for t in (q_BPNK, k_BPNK, v_BPNK))
        scores_BNPP = torch.matmul(q_BNPK, k_BNPK.transpose(2, 3)) * self.head_dim**-0.5
        out_BNPK = torch.matmul(torch.softmax(scores_BNPP, dim=-1), v_BNPK)
        return self.o_proj(out_BNPK.transpose(1, 2).reshape(b, p, -1))


class _MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.self_attn = _Attention(config)
        self.mlp = _MLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, x_BPH: torch.Tensor, cos_PD: torch.Tensor, sin_PD: torch.Tensor) -> torch.Tensor:
        x_BPH = x_BPH + self.self_attn(self.input_layernorm(x_BPH), cos_PD, sin_PD)
        return x_BPH + self.mlp(self.post_attention_layernorm(x_BPH))


class _Encoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(_EncoderLayer(config) for _ in range(config.num_hidden_layers))


class _PatchEmbedding(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.linear = nn.Linear(config.num_channels * config.patch_size**2, config.hidden_size, bias=False)

    def forward(self, pixels_TCHW: torch.Tensor) -> torch.Tensor:
        patches_TFP = F.unfold(pixels_TCHW, kernel_size=self.patch_size, stride=self.patch_size)
        return self.linear(patches_TFP.permute(0, 2, 1))


def pixel_shuffle(x_TPC: torch.Tensor, ratio: float) -> torch.Tensor:
    """transformers' pixel_shuffle: fewer patches, more channels (ratio 0.5: 4x fewer, 4x wider)."""
    t, p, _ = x_TPC.shape
    side = int(p**0.5)
    x = x_TPC.reshape(t, side, side, -1)
    t, h, w, c = x.shape
    x = x.reshape(t, h, int(w * ratio), int(c / ratio)).permute(0, 2, 1, 3)
    x = x.reshape(t, int(h * ratio), int(w * ratio), int(c / ratio**2)).permute(0, 2, 1, 3)
    return x.reshape(t, -1, x.shape[-1])


class _AdapterMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.intermediate_size, config.projector_input_dim, bias=False)
        self.fc2 = nn.Linear(config.projector_output_dim, config.projector_output_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc2(F.gelu(self.fc1(x))))


class _VisionAdapter(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.ratio = config.pixel_shuffle_ratio
        self.mlp = _AdapterMLP(config)

    def forward(self, x_TPC: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(x_TPC, self.ratio))


class VisionModel(nn.Module):
    """Tiles [T, C, H, W] (normalized pixels) -> features [T, P', vision_output_dim]."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        num_patches = (config.image_size // config.patch_size) ** 2 + 1
        self.patch_embedding = _PatchEmbedding(config)
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.positional_embedding_vlm = nn.Parameter(torch.zeros(num_patches, config.hidden_size))
        self.layernorm_pre = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.layernorm_post = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.model = _Encoder(config)
        self.vision_adapter = _VisionAdapter(config)
        cos_PD, sin_PD = rotary_cos_sin(config)
        self.register_buffer("rope_cos", cos_PD, persistent=False)
        self.register_buffer("rope_sin", sin_PD, persistent=False)

    def forward(self, pixels_TCHW: torch.Tensor) -> torch.Tensor:
        x_TPH = self.patch_embedding(pixels_TCHW)
        cls_T1H = self.class_embedding.expand(x_TPH.shape[0], 1, x_TPH.shape[-1])
        # The class token goes last, as in transformers (its rotary angle is 0).
        x_TPH = torch.cat([x_TPH, cls_T1H], dim=1) + self.positional_embedding_vlm.to(x_TPH.dtype)
        x_TPH = self.layernorm_pre(x_TPH)
        for layer in self.model.layers:
            x_TPH = layer(x_TPH, self.rope_cos, self.rope_sin)
        x_TPH = self.layernorm_post(x_TPH)[:, :-1, :]
        return self.vision_adapter(x_TPH)


class MultiModalProjector(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_output_dim, config.text_hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_1(x)


class VisionTower(nn.Module):
    """Vision model + projector: tiles -> image features [T * P', text hidden], one row per <|patch|> token,
    in the order transformers' forward scatters them into the prompt."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.vision_model = VisionModel(config)
        self.multi_modal_projector = MultiModalProjector(config)

    def forward(self, pixels_TCHW: torch.Tensor) -> torch.Tensor:
        features_TPV = self.vision_model(pixels_TCHW)
        return self.multi_modal_projector(features_TPV.reshape(-1, features_TPV.shape[-1]))


def load_vision_state(tower: VisionTower, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load `vision_model.*` / `multi_modal_projector.*` tensors (checkpoint names) into `tower`."""
    wanted = {k: v for k, v in tensors.items() if k.startswith(("vision_model.", "multi_modal_projector."))}
    if not wanted:
        raise MoecError(f"{source}: no vision_model.* tensors: the checkpoint has no vision tower (text-only)")
    # transformers keeps the rotary table as a non-persistent buffer; a checkpoint that has it anyway is fine.
    wanted = {k: v for k, v in wanted.items() if "rotary_embedding" not in k}
    expected = tower.state_dict()
    wrong = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in sorted(wanted.items())
             if k in expected and v.shape != expected[k].shape]
    if wrong:
        name, got, want = wrong[0]
        raise MoecError(f"{source}: vision tensor {name} has shape {list(got)} but the vision config needs {list(want)} "
                        f"({len(wrong)} tensor(s) differ); check that config.json belongs to these weights")
    missing, unexpected = tower.load_state_dict(wanted, strict=False)
    if missing or unexpected:
        raise MoecError(
            f"{source}: vision tensors do not match the vision config (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); check that config.json belongs to these weights"
        )
