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
    return inject.vl_keys_values(hidden, scale_msa, norm=block.attention_norm1, project_kv=lambda h: _project(attn, h),
                                 k_norm=lambda k: _norm(attn.k_norm, k), n_heads=attn.n_local_heads,
                                 n_kv_heads=attn.n_local_kv_heads, head_dim=attn.head_dim, freqs=freqs)


def reference_pass(dit, base, latent: torch.Tensor, sigma: torch.Tensor, caption: torch.Tensor, num_tokens,
                   transformer_options: dict):
    """A reference latent (model space, [1, C, H, W]) at σ embedded exactly as NextDiT._forward embeds a latent:
    → (hidden [1, L, D], freqs, adaLN input, image-token start, image-token count); advance it with
    `advance_reference`. Mirrors BaseModel._apply_model (calculate_input, timestep, dtype) and the start of
    NextDiT._forward (t = 1 − timestep, t_embedder, patchify_and_embed with its refiners)."""
    import comfy.ldm.common_dit
    import comfy.model_management

    ms = base.model_sampling
    dtype = base.get_dtype_inference()
    xc = ms.calculate_input(sigma, latent).to(dtype)
    timesteps = ms.timestep(sigma).float()
    context = comfy.model_management.cast_to_device(caption, xc.device, dtype)
    x = comfy.ldm.common_dit.pad_to_patch_size(xc, (dit.patch_size, dit.patch_size))
    adaln = dit.t_embedder((1.0 - timesteps) * dit.time_scale, dtype=x.dtype)
    if dit.clip_text_pooled_proj is not None:  # as _forward without a pooled input
        pooled = torch.zeros((x.shape[0], dit.clip_text_dim), device=x.device, dtype=x.dtype)
        adaln = dit.time_text_embed(torch.cat((adaln, pooled), dim=-1))
    img, mask, _, cap_size, freqs, _ = dit.patchify_and_embed(x, context, None, adaln, num_tokens,
                                                              transformer_options=transformer_options)
    n_img = (x.shape[-2] // dit.patch_size) * (x.shape[-1] // dit.patch_size)
    return img, mask, freqs.to(img.device), adaln, cap_size[0], n_img


def _project(attn, hidden: torch.Tensor) -> torch.Tensor:
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


def _norm(norm, x: torch.Tensor) -> torch.Tensor:
    """The block's own q- or k-norm with the model's weight cast (lowvram/LoRA aware) and epsilon rule."""
    if not isinstance(norm, torch.nn.RMSNorm):  # qk_norm off: Identity
        return norm(x)
    import comfy.ops

    scale, _, stream = comfy.ops.cast_bias_weight(norm, x, offloadable=True)
    eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
    out = inject.rms_norm_heads(x, scale, eps)
    comfy.ops.uncast_bias_weight(norm, scale, None, stream)
    return out


def direction_in_model_space(dit, direction: torch.Tensor) -> torch.Tensor:
    """[K, D_cap] → [K, D]: W·(g ⊙ d), the caption embedder's linear map with its RMSNorm gain g folded in and
    its bias dropped: where a step along d in caption-feature space points once embedded (up to the per-token
    norm, which only rescales)."""
    import comfy.ops

    norm, lin = dit.cap_embedder[0], dit.cap_embedder[1]
    gain, _, gain_stream = comfy.ops.cast_bias_weight(norm, direction, offloadable=True)
    weight, bias, stream = comfy.ops.cast_bias_weight(lin, direction, offloadable=True)
    try:
        scaled = direction if gain is None else direction * gain
        return torch.nn.functional.linear(scaled, weight)
    finally:
        comfy.ops.uncast_bias_weight(lin, weight, bias, stream)
        comfy.ops.uncast_bias_weight(norm, gain, None, gain_stream)
