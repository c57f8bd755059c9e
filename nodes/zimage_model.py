"""Z-Image model glue for the DiT Layer Injection: which MODEL is Z-Image, and its own layers called the way
ComfyUI calls them (caption embedding, the k/v rows of a block's qkv, its k-norm with the weight cast)."""
from __future__ import annotations

import torch

from ..vl_core import inject


def zimage_diffusion_model(model):
    """The NextDiT of a Z-Image MODEL, or a ValueError that says what was connected.

    Z-Image is told apart from Lumina 2 (same NextDiT class, same caption embedder) the way ComfyUI does it:
    by the model config its detection picked, comfy.supported_models.ZImage (or a subclass), never by width.
    """
    import comfy.ldm.lumina.model as lumina
    import comfy.supported_models

    if not hasattr(model, "get_model_object") or not hasattr(model, "clone"):
        raise ValueError(f"model must be a MODEL (ModelPatcher), got {type(model).__name__}")
    dit = model.get_model_object("diffusion_model")
    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    if not isinstance(dit, lumina.NextDiT):  # every NextDiT has cap_embedder, context_refiner and layers
        raise ValueError(f"DiT Layer Injection needs a Z-Image model (ComfyUI's NextDiT with a caption embedder), "
                         f"got {type(base if base is not None else model).__name__} / {type(dit).__name__}: load "
                         "z_image_turbo_bf16.safetensors with UNETLoader")
    if not isinstance(config, comfy.supported_models.ZImage):
        raise ValueError(f"DiT Layer Injection needs a Z-Image model, got a {type(config).__name__} NextDiT "
                         "(ComfyUI detected another model of the same family, e.g. Lumina 2, which is not "
                         "conditioned on Qwen3 hidden states): load z_image_turbo_bf16.safetensors with UNETLoader")
    return dit


def caption_width(dit) -> int:
    """Input width of the model's caption embedder (Z-Image: 2560), read from the model."""
    linear = dit.cap_embedder[1]
    width = getattr(linear, "in_features", None)
    if width is None:
        width = linear.weight.shape[1]
    return int(width)


def embed_like_caption(dit, feats: torch.Tensor, transformer_options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """feats [1, n, D_cap] → (hidden [1, n', D], freqs_cis [1, n', 1, d/2, 2, 2]) exactly as the model embeds a
    caption: its own embed_cap (cap_embedder, pad to pad_tokens_multiple with cap_pad_token, RoPE positions
    1..n') then its context_refiner with mask None. n' = n padded."""
    embeds, freqs, _ = dit.embed_cap(feats, offset=0, bsz=1, device=feats.device, dtype=feats.dtype)
    hidden, freqs_cis = embeds[0], freqs[0].to(feats.device)
    for layer in dit.context_refiner:
        hidden = layer(hidden, None, freqs_cis, transformer_options=transformer_options)
    return hidden, freqs_cis


def block_keys_values(block, hidden: torch.Tensor, vec: torch.Tensor, freqs: torch.Tensor | None):
    """k, v [b, H, n, d] of embedded VL tokens through one main block: inject.vl_keys_values with the block's
    attention_norm1, adaLN scale (first chunk of adaLN_modulation(vec)), qkv k/v rows and k-norm."""
    attn = block.attention
    scale_msa = block.adaLN_modulation(vec).chunk(4, dim=1)[0]
    return inject.vl_keys_values(hidden, scale_msa, norm=block.attention_norm1, project_kv=lambda h: _project_kv(attn, h),
                                 k_norm=lambda k: _k_norm(attn, k), n_heads=attn.n_local_heads,
                                 n_kv_heads=attn.n_local_kv_heads, head_dim=attn.head_dim, freqs=freqs)


def _project_kv(attn, hidden: torch.Tensor) -> torch.Tensor:
    """[b, n, 2·Hkv·d]: only the k/v rows of the block's fused qkv projection (the VL queries are never needed),
    with the weight cast the way comfy.ops does it (lowvram offload, LoRA weight functions). Quantized weight
    types fall back to the full module call ([q | k | v], which split_kv also accepts)."""
    import comfy.ops

    lin = attn.qkv
    q_rows = attn.n_local_heads * attn.head_dim
    weight, bias, stream = comfy.ops.cast_bias_weight(lin, hidden, offloadable=True)
    try:
        if type(weight) in (torch.Tensor, torch.nn.Parameter) and (bias is None or type(bias) in
                                                                    (torch.Tensor, torch.nn.Parameter)):
            return torch.nn.functional.linear(hidden, weight[q_rows:], None if bias is None else bias[q_rows:])
    finally:
        comfy.ops.uncast_bias_weight(lin, weight, bias, stream)
    return lin(hidden)


def _k_norm(attn, k: torch.Tensor) -> torch.Tensor:
    """The block's own k-norm with the model's weight cast (lowvram/LoRA aware) and epsilon rule."""
    norm = attn.k_norm
    if not isinstance(norm, torch.nn.RMSNorm):  # qk_norm off: Identity
        return norm(k)
    import comfy.ops

    scale, _, stream = comfy.ops.cast_bias_weight(norm, k, offloadable=True)
    eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
    out = inject.rms_norm_heads(k, scale, eps)
    comfy.ops.uncast_bias_weight(norm, scale, None, stream)
    return out
