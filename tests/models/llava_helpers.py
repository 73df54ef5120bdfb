"""A tiny random LLaVA saved by transformers (CLIP tower of 42 px images: 9 tokens each) and the test photographs."""

from pathlib import Path

import torch
import transformers
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from tests.models.hf_oracle import random_hf_model

IMAGES = Path(__file__).resolve().parent.parent / "assets" / "images"
IMAGE_TOKEN = 500
IMAGE_SIZE = 42  # 3 × 3 patches of 14: 9 image tokens
TINY_LLAVA = dict(
    model_type="llava",
    image_token_index=IMAGE_TOKEN,
    vision_feature_layer=-2,
    vision_feature_select_strategy="default",
    text_config=dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_hidden_layers=3, image_size=IMAGE_SIZE, patch_size=14, projection_dim=32),
)


def photo(name: str) -> Image.Image:
    return Image.open(IMAGES / f"{name}.png")


def save_tiny_llava(path: Path) -> torch.nn.Module:
    """A random tiny LLaVA saved by transformers at `path`, with its CLIP preprocessor config."""
    model = random_hf_model(TINY_LLAVA, transformers.AutoModelForImageTextToText)
    model.save_pretrained(path, safe_serialization=True)
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                          crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)
    return model
