"""Tiny randomly initialised diffusers pipelines, built and saved by the tests (nothing is downloaded).

Each builder writes a pipeline with ``save_pretrained`` into a directory; the method loads it back through
``from_pretrained``, the path a user's Stable Diffusion or DDPM takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PROMPT_WORDS = "a realistic photo of t-shirt/top trouser class0123456789 , close-up studio".split()


def save_ddpm(path: Path, sample_size: int = 16, class_embeds: int | None = None, seed: int = 0) -> Path:
    """A pixel-space UNet2DModel + DDPM scheduler (a DDPMPipeline), optionally class-conditional."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=sample_size, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=class_embeds)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(path)
    return path


def _tokenizer(folder: Path):
    """A character-level CLIP tokenizer over a tiny vocabulary (CLIP's BPE with no merges)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for char in sorted(set("".join(PROMPT_WORDS) + "abcdefghijklmnopqrstuvwxyz/-,0123456789")):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=32), len(vocab)


def save_stable_diffusion(path: Path, seed: int = 0) -> Path:
    """A Stable Diffusion pipeline in miniature: UNet2DConditionModel + AutoencoderKL + CLIP text encoder +
    tokenizer + DDIM scheduler; 16x16 images from 8x8x4 latents."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer, vocab_size = _tokenizer(path.parent / f"{path.name}-tokenizer-src")
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                                num_attention_heads=2, num_hidden_layers=1,
                                                max_position_embeddings=32, projection_dim=16, bos_token_id=0,
                                                eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=4, sample_size=16)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=DDIMScheduler(num_train_timesteps=100), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(path)
    return path


def save_dit(path: Path, id2label: dict[int, str], seed: int = 0) -> Path:
    """A DiT pipeline in miniature: DiTTransformer2DModel (learned sigma, 1000 classes + the null class) + VAE +
    DDIM; ``id2label`` is written into model_index.json as the hub's DiT pipelines carry it."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                                        norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=4, sample_size=16)
    scheduler = DDIMScheduler(num_train_timesteps=100)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(path)
    index = json.loads((path / "model_index.json").read_text())
    index["id2label"] = {str(k): v for k, v in id2label.items()}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path
