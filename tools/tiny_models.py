"""Tiny Qwen3-VL models for tests, built offline: a Hugging Face folder and ComfyUI's own native class.

Both use the real Qwen3 vocabulary (ComfyUI ships it in comfy/text_encoders/qwen25_tokenizer) and the
real Qwen3-VL-4B architecture at toy width/depth, so the backends can be compared weight for weight.

Shipped with the pack (the demo uses them) and imported by the tests:

    from tools.tiny_models import comfy_path, prepare_comfy, make_hf_tiny_qwen3vl, make_native_tiny_qwen3vl_clip
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
import sys
import types

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "comfyui_zimage_vl"   # the repo root imported as a package (the nodes use relative imports)

TINY_TEXT = dict(intermediate_size=512, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=128, rope_theta=5_000_000.0, mrope_section=[24, 20, 20], vocab_size=151936)
TINY_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16, temporal_patch_size=2,
                   spatial_merge_size=2, deepstack_visual_indexes=[0, 1], num_position_embeddings=2304)
QWEN3VL_SPECIAL_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                          "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}


# ------------------------------------------------------------------------------------------ ComfyUI host

def comfy_path() -> str | None:
    """The ComfyUI host checkout: $COMFYUI_PATH, else ~/ComfyUI if it exists, else None."""
    path = os.environ.get("COMFYUI_PATH") or os.path.expanduser("~/ComfyUI")
    return path if os.path.isfile(os.path.join(path, "comfy", "sd.py")) else None


def comfy_tokenizer_dir() -> str | None:
    host = comfy_path()
    return None if host is None else os.path.join(host, "comfy", "text_encoders", "qwen25_tokenizer")


def prepare_comfy(cpu: bool = True) -> str:
    """Make `comfy` importable in this (test) process: host on sys.path, argument parsing off, CPU forced.

    Must run before the first `import comfy.model_management` (that module reads the args at import;
    later calls change nothing). Raises RuntimeError when no host is found.
    """
    host = comfy_path()
    if host is None:
        raise RuntimeError("no ComfyUI host found: set COMFYUI_PATH to a ComfyUI checkout")
    if host not in sys.path:
        sys.path.insert(0, host)
    import comfy.options

    comfy.options.enable_args_parsing(False)   # comfy.cli_args then parses [] instead of pytest's argv
    import comfy.cli_args

    if cpu and "comfy.model_management" not in sys.modules:   # once imported, its device choice is fixed
        comfy.cli_args.args.cpu = True
    return host


def import_pack(module: str):
    """Import `<repo>/<module>` (e.g. "nodes.backends") with the repo root as package PACK_NAME.

    The node modules use relative imports (`from ..vl_core import ...`) as ComfyUI loads the pack as a
    package; the package's own __init__ (node registration) is not run.
    """
    if PACK_NAME not in sys.modules:
        pkg = types.ModuleType(PACK_NAME)
        pkg.__path__ = [REPO_ROOT]
        pkg.__file__ = os.path.join(REPO_ROOT, "__init__.py")
        sys.modules[PACK_NAME] = pkg
    return importlib.import_module(f"{PACK_NAME}.{module}")


# ------------------------------------------------------------------------------------------ Hugging Face

# Qwen2/Qwen3 special tokens and their ids in the real vocabulary (only for the synthetic stand-in below;
# the code under test reads ids from the tokenizer).
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
_QWEN_FIRST_SPECIAL_ID = 151643


def write_synthetic_qwen_tokenizer(path: str) -> None:
    """A byte-level stand-in for the Qwen tokenizer (no merges: one token per byte) with the Qwen special
    tokens at their real ids. Used only when no ComfyUI host provides the real vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = [chr(b) for b in range(33, 127)] + [chr(b) for b in range(161, 173)] + \
                 [chr(b) for b in range(174, 256)]
    extra = [b for b in range(256) if chr(b) not in byte_chars]
    byte_chars += [chr(256 + i) for i in range(len(extra))]           # GPT-2 bytes_to_unicode
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    for i in range(len(vocab), _QWEN_FIRST_SPECIAL_ID):
        vocab[f"<unused_{i}>"] = i
    for i, token in enumerate(_QWEN_SPECIALS):
        vocab[token] = _QWEN_FIRST_SPECIAL_ID + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _QWEN_SPECIALS])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            additional_special_tokens=_QWEN_SPECIALS[1:]).save_pretrained(path)


def _copy_tokenizer(path: str) -> str:
    """Copy ComfyUI's real Qwen tokenizer into path ("comfyui"), or write the synthetic stand-in ("synthetic")."""
    src = comfy_tokenizer_dir()
    if src is None or not os.path.isdir(src):
        write_synthetic_qwen_tokenizer(path)
        return "synthetic"
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), os.path.join(path, name))
    return "comfyui"


def make_hf_tiny_qwen3vl(path: str, hidden_size: int = 256, seed: int = 0, num_layers: int = 4) -> str:
    """Save a random tiny `Qwen3VLForConditionalGeneration` + the real Qwen tokenizer into `path`; returns path.

    The tokenizer is ComfyUI's real Qwen vocabulary, or without a ComfyUI host a byte-level stand-in
    with the Qwen special tokens at their real ids. Text: hidden_size, FFN 512, num_layers (default 4;
    layer -6 needs ≥ 5) layers, 2 heads / 1 KV head of 128, rope θ 5e6, interleaved MRoPE [24, 20, 20],
    tied embeddings, vocab 151936. Vision: depth 2, width 64, FFN 128, 2 heads, patch 16, temporal 2,
    merge 2, deepstack after blocks [0, 1]. Special-token ids in the config are read from the
    tokenizer. fp32, ≈ 40 M parameters (mostly the embedding).
    """
    from transformers import AutoTokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    os.makedirs(path, exist_ok=True)
    _copy_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    ids = {key: tok.convert_tokens_to_ids(token) for key, token in QWEN3VL_SPECIAL_TOKENS.items()}
    for key, token in QWEN3VL_SPECIAL_TOKENS.items():
        if ids[key] is None or ids[key] == tok.unk_token_id or tok(token)["input_ids"] != [ids[key]]:
            raise RuntimeError(f"tokenizer in {path} does not know {token} as one special token")

    t = TINY_TEXT
    text_config = dict(
        hidden_size=hidden_size, intermediate_size=t["intermediate_size"], num_hidden_layers=num_layers,
        num_attention_heads=t["num_attention_heads"], num_key_value_heads=t["num_key_value_heads"],
        head_dim=t["head_dim"], vocab_size=t["vocab_size"], max_position_embeddings=262144, rms_norm_eps=1e-6,
        # the legacy keys (rope_theta + rope_scaling): transformers 4.57 reads only these, 5.x converts them
        rope_theta=t["rope_theta"],
        rope_scaling={"rope_type": "default", "mrope_section": t["mrope_section"], "mrope_interleaved": True},
        tie_word_embeddings=True)
    vision_config = dict(TINY_VISION, out_hidden_size=hidden_size, in_channels=3, hidden_act="gelu_pytorch_tanh")
    config = Qwen3VLConfig(text_config=text_config, vision_config=vision_config, tie_word_embeddings=True, **ids)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------ native ComfyUI

def _tiny_native_model_type(hidden_size: int, num_layers: int) -> str:
    """Register (once) a test-only model_type in comfy.text_encoders.qwen3vl with the tiny sizes."""
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.qwen3vl as qwen3vl

    model_type = f"qwen3vl_tinytest_{hidden_size}x{num_layers}"
    if model_type in qwen3vl.QWEN3VL_CONFIGS:
        return model_type
    t = TINY_TEXT
    fields = [("hidden_size", int, hidden_size), ("intermediate_size", int, t["intermediate_size"]),
              ("num_hidden_layers", int, num_layers),
              ("num_attention_heads", int, t["num_attention_heads"]),
              ("num_key_value_heads", int, t["num_key_value_heads"]),
              ("rope_theta", float, t["rope_theta"]), ("vocab_size", int, t["vocab_size"])]
    config_cls = dataclasses.make_dataclass(
        f"Qwen3VLTinyTest{hidden_size}x{num_layers}Config", [(n, tp, dataclasses.field(default=v)) for n, tp, v in fields],
        bases=(llama.Qwen3VL_4BConfig,))
    config_cls.head_dim = t["head_dim"]
    config_cls.rope_dims = list(t["mrope_section"])
    config_cls.lm_head = False
    v = TINY_VISION
    qwen3vl.QWEN3VL_CONFIGS[model_type] = config_cls
    qwen3vl.QWEN3VL_VISION[model_type] = dict(
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"], depth=v["depth"],
        deepstack_visual_indexes=list(v["deepstack_visual_indexes"]), num_heads=v["num_heads"],
        patch_size=v["patch_size"], temporal_patch_size=v["temporal_patch_size"],
        spatial_merge_size=v["spatial_merge_size"], num_position_embeddings=v["num_position_embeddings"])
    return model_type


def _seeded_init_(module: torch.nn.Module, seed: int) -> None:
    """Deterministic init for ComfyUI's uninitialised (torch.empty) weights: N(0, 0.02), norms 1, biases 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def _clip_from_target(clip_cls, tokenizer_cls, state_dict: dict | None, seed: int, dtype: torch.dtype):
    import comfy.sd

    target = types.SimpleNamespace(params={}, clip=clip_cls, tokenizer=tokenizer_cls)
    cpu = torch.device("cpu")
    clip = comfy.sd.CLIP(target, state_dict=[state_dict] if state_dict else [],
                         model_options={"dtype": dtype, "load_device": cpu, "offload_device": cpu,
                                        "initial_device": cpu})
    if not state_dict:
        _seeded_init_(clip.cond_stage_model, seed)
    return clip


def _hf_state_dict_for_comfy(hf_path: str) -> dict:
    """The HF checkpoint's tensors with ComfyUI's Qwen3-VL key renaming (comfy/sd.py)."""
    import comfy.utils
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(hf_path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors in {hf_path}")
    sd = {}
    for f in files:
        sd.update(load_file(os.path.join(hf_path, f)))
    if "lm_head.weight" in sd:
        sd["model.lm_head.weight"] = sd.pop("lm_head.weight")
    return comfy.utils.state_dict_prefix_replace(
        sd, {"model.language_model.": "model.", "model.visual.": "visual.", "lm_head.": "model.lm_head."})


def make_native_tiny_qwen3vl_clip(hf_path: str | None = None, hidden_size: int = 256, seed: int = 0,
                                  dtype: torch.dtype = torch.float32, num_layers: int = 4):
    """A `comfy.sd.CLIP` holding ComfyUI's native Qwen3-VL class (comfy/text_encoders/qwen3vl.py) at tiny size.

    With `hf_path` (a folder from make_hf_tiny_qwen3vl with the same hidden_size and num_layers) its weights are loaded
    with the prefix replacement ComfyUI applies to Qwen3-VL checkpoints; otherwise weights are random
    from `seed`. CPU only; call prepare_comfy() first.
    """
    import comfy.text_encoders.qwen3vl as qwen3vl

    model_type = _tiny_native_model_type(hidden_size, num_layers)
    base_tokenizer = qwen3vl.tokenizer(model_type=model_type)

    class TinyQwen3VLTokenizer(base_tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)
            getattr(self, self.clip).embedding_size = hidden_size

    state_dict = _hf_state_dict_for_comfy(hf_path) if hf_path else None
    clip = _clip_from_target(qwen3vl.te(model_type=model_type), TinyQwen3VLTokenizer, state_dict, seed, dtype)
    if state_dict:
        inner = getattr(clip.cond_stage_model, clip.cond_stage_model.clip)
        missing = [k for k in inner.transformer.state_dict() if k not in state_dict]
        if missing:
            raise RuntimeError(f"HF checkpoint {hf_path} lacks native weights {missing[:5]}...")
    return clip


def make_native_tiny_zimage_clip(hidden_size: int = 64, seed: int = 0):
    """ComfyUI's Z-Image text encoder (plain Qwen3-4B, comfy/text_encoders/z_image.py) at toy size: not a VL model."""
    import comfy.text_encoders.z_image as z_image

    tiny = {"hidden_size": hidden_size, "intermediate_size": 2 * hidden_size, "num_hidden_layers": 3,
            "num_attention_heads": 2, "num_key_value_heads": 1}

    class TinyZImageTE(z_image.ZImageTEModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype,
                             model_options={**model_options, "qwen3_4b_model_config": tiny})

    return _clip_from_target(TinyZImageTE, z_image.ZImageTokenizer, None, seed, torch.float32)
