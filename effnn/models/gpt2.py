"""GPT-2 (Radford et al., 2019) in plain PyTorch, and its Monarch version (Dao et al., "Monarch",
ICML 2022, Table 2).

Module names follow Hugging Face's ``GPT2LMHeadModel`` (``transformer.wte``, ``transformer.wpe``,
``transformer.h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}``,
``transformer.ln_f``, ``lm_head`` tied to ``wte``), but the projections are ``nn.Linear``, whose
weight is the transpose of HF's ``Conv1D`` weight: load HF/OpenAI checkpoints through
:func:`convert_hf_gpt2_state_dict`.

Monarch configurations (see docs/models.md for how they compare with the paper's table;
GMACs for one sequence of 1024 tokens, LM head excluded, attention scores counted in full):

=========== ================================================= =============== ===============
preset      linears swapped for ``MonarchLinear(nblocks=4)``  small           medium
=========== ================================================= =============== ===============
None        none (dense)                                      124.44M / 106.3 354.82M / 360.8
"qkv_mlp"   attn.c_attn, mlp.c_fc, mlp.c_proj (default)       71.36M / 51.94  166.08M / 167.5
"all"       the four block linears                            67.82M / 48.32  153.50M / 154.6
"mlp"       mlp.c_fc, mlp.c_proj (the official fly configs)   85.51M / 66.44  216.41M / 219.0
=========== ================================================= =============== ===============
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effnn.models._monarch import build_model, reset_other_modules

__all__ = [
    "GPT2LMHeadModel",
    "GPT2_MONARCH_PRESETS",
    "convert_hf_gpt2_state_dict",
    "gpt2_medium",
    "gpt2_small",
]

#: preset name -> module-name suffixes swapped for MonarchLinear
GPT2_MONARCH_PRESETS: dict[str, tuple[str, ...]] = {
    "qkv_mlp": ("attn.c_attn", "mlp.c_fc", "mlp.c_proj"),
    "all": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    "mlp": ("mlp.c_fc", "mlp.c_proj"),
}


class GPT2Attention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, **factory) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"GPT2Attention: n_embd={n_embd} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, **factory)
        self.c_proj = nn.Linear(n_embd, n_embd, **factory)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        qkv = self.c_attn(x).reshape(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class GPT2MLP(nn.Module):
    def __init__(self, n_embd: int, n_inner: int, **factory) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, n_inner, **factory)
        self.act = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(n_inner, n_embd, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, n_inner: int, eps: float, **factory) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=eps, **factory)
        self.attn = GPT2Attention(n_embd, n_head, **factory)
        self.ln_2 = nn.LayerNorm(n_embd, eps=eps, **factory)
        self.mlp = GPT2MLP(n_embd, n_inner, **factory)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    """The transformer body: token ids (B, T) -> final hidden states (B, T, n_embd)."""

    def __init__(
        self,
        vocab_size: int,
        n_positions: int,
        n_embd: int,
        n_layer: int,
        n_head: int,
        n_inner: int,
        eps: float,
        **factory,
    ) -> None:
        super().__init__()
        self.n_positions = n_positions
        self.wte = nn.Embedding(vocab_size, n_embd, **factory)
        self.wpe = nn.Embedding(n_positions, n_embd, **factory)
        self.h = nn.ModuleList(
            [GPT2Block(n_embd, n_head, n_inner, eps, **factory) for _ in range(n_layer)]
        )
        self.ln_f = nn.LayerNorm(n_embd, eps=eps, **factory)

    def forward(self, input_ids: Tensor) -> Tensor:
        if input_ids.dim() != 2:
            raise ValueError(
                f"GPT2Model: input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}"
            )
        t = input_ids.shape[1]
        if t > self.n_positions:
            raise ValueError(
                f"GPT2Model: sequence length {t} exceeds n_positions={self.n_positions}"
            )
        pos = torch.arange(t, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class GPT2LMHeadModel(nn.Module):
    """GPT-2 language model with the LM head tied to the token embedding.

    Args: as Hugging Face's ``GPT2Config`` (a subset; ``n_inner=None`` means 4 * n_embd);
    ``device``/``dtype`` as for ``nn.Linear`` (``device="meta"`` allocates nothing).

    Shape: input_ids (B, T) with T <= n_positions -> logits (B, T, vocab_size).
    """

    def __init__(
        self,
        vocab_size: int = 50257,
        n_positions: int = 1024,
        n_embd: int = 768,
        n_layer: int = 12,
        n_head: int = 12,
        n_inner: int | None = None,
        layer_norm_epsilon: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.n_layer = n_layer
        self.transformer = GPT2Model(
            vocab_size,
            n_positions,
            n_embd,
            n_layer,
            n_head,
            n_inner or 4 * n_embd,
            layer_norm_epsilon,
            **factory,
        )
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False, **factory)
        self.reset_parameters()

    def tie_weights(self) -> None:
        """Share the LM head's weight with the token embedding (as GPT-2). ``reset_parameters``
        calls it; call it yourself after ``to_empty``, which unties shared parameters."""
        self.lm_head.weight = self.transformer.wte.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2's init: N(0, 0.02) for linears and embeddings, zero biases, and the residual
        projections (``c_proj``) scaled by 1/sqrt(2 * n_layer); other layers (e.g. the
        ``MonarchLinear`` put in by ``swap_linear``) use their own ``reset_parameters``."""
        self.tie_weights()
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and m is not self.lm_head:
                std = 0.02 / math.sqrt(2 * self.n_layer) if name.endswith("c_proj") else 0.02
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        reset_other_modules(self, (nn.Linear, nn.Embedding, nn.LayerNorm))

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm_head(self.transformer(input_ids))


_CONV1D_WEIGHTS = (
    ".attn.c_attn.weight",
    ".attn.c_proj.weight",
    ".mlp.c_fc.weight",
    ".mlp.c_proj.weight",
)


def convert_hf_gpt2_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map a Hugging Face / OpenAI GPT-2 state dict onto :class:`GPT2LMHeadModel`.

    Transposes the ``Conv1D`` weights (HF stores them (in, out)), adds the ``transformer.`` prefix
    of bare ``GPT2Model`` checkpoints, drops the causal-mask buffers (``attn.bias``,
    ``attn.masked_bias``) and fills the tied ``lm_head.weight`` from ``wte`` when it is absent.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if key != "lm_head.weight" and not key.startswith("transformer."):
            key = "transformer." + key
        if key.endswith(_CONV1D_WEIGHTS):
            value = value.t().contiguous()
        out[key] = value
    if "lm_head.weight" not in out and "transformer.wte.weight" in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def _gpt2(
    factory: str,
    size: Mapping[str, int],
    monarch,
    nblocks,
    init,
    device,
    dtype,
    kwargs,
) -> GPT2LMHeadModel:
    args = dict(size)
    args.update(kwargs)
    return build_model(
        lambda dev: GPT2LMHeadModel(device=dev, dtype=dtype, **args),
        monarch,
        GPT2_MONARCH_PRESETS,
        "qkv_mlp",
        nblocks,
        init,
        device,
        factory,
    )


def gpt2_small(
    monarch: str | Sequence[str] | bool | None = None,
    nblocks: int = 4,
    *,
    init: str = "random",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs,
) -> GPT2LMHeadModel:
    """GPT-2 small (124M: 12 layers, 768 wide, 12 heads), optionally with Monarch linears.

    Args:
        monarch: None (dense), True (= "qkv_mlp", the configuration closest to the Monarch
            paper's Table 2), a preset of :data:`GPT2_MONARCH_PRESETS`, or a list of module names
            / suffixes for ``effnn.swap_linear(target_modules=...)``.
        nblocks: blocks per Monarch factor (the paper uses 4).
        init: "random" (train from scratch, as the paper) or "project".
        device, dtype: where to build it; ``device="meta"`` allocates nothing.
        **kwargs: overrides of :class:`GPT2LMHeadModel` arguments.

    Example::

        >>> model = gpt2_small(monarch=True, device="meta")
        >>> sum(p.numel() for p in model.parameters())  # tied LM head counted once
        71355648
    """
    size = dict(n_embd=768, n_layer=12, n_head=12)
    return _gpt2("gpt2_small", size, monarch, nblocks, init, device, dtype, kwargs)


def gpt2_medium(
    monarch: str | Sequence[str] | bool | None = None,
    nblocks: int = 4,
    *,
    init: str = "random",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs,
) -> GPT2LMHeadModel:
    """GPT-2 medium (355M: 24 layers, 1024 wide, 16 heads), optionally with Monarch linears.

    Arguments as :func:`gpt2_small`.
    """
    size = dict(n_embd=1024, n_layer=24, n_head=16)
    return _gpt2("gpt2_medium", size, monarch, nblocks, init, device, dtype, kwargs)
