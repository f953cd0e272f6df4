"""Tiny text encoder and VAE folders with random weights, for tests, the demo and CPU trials.

``write_tiny_models(out)`` writes ``out/t5`` (a 2-layer T5 encoder of width 32 with a word-level
tokenizer in T5's special-token layout: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2) and ``out/vae`` (an
AutoencoderKL that halves height and width, 4 latent channels); ``--video-vae`` adds ``out/video_vae``
(a Wan video VAE that compresses 1 + 4k frames to 1 + k and sides by 4). They load exactly like real ones.

Run: ``python -m ferryman.apps.opensora.tiny --out DIR``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

WORDS = [
    "a", "an", "the", "of", "on", "in", "with", "and", "moving", "right", "left", "up", "down",
    "diagonally", "background", "circle", "square", "triangle", "star", "ring", "shape", "red",
    "green", "blue", "yellow", "white", "black", "purple", "orange", "pink", "grey", "cyan",
    "small", "large", "big", "tiny", "slowly", "quickly", "video", "clip", "frame", "camera",
    "pans", "zooms", "sky", "sea", "city", "cat", "dog", "person", "walking", "running", "flying",
    "over", "under", ".",
]
SPECIALS = ["<pad>", "</s>", "<unk>"]


def build_word_tokenizer(words: list[str] = WORDS):
    """A T5-layout word-level tokenizer (lower-cased, split on whitespace and punctuation)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(set(words)))}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def write_tiny_t5(out: Path, tokenizer_dir: Path | None = None, *, d_model: int = 32, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else build_word_tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(seed)
    T5EncoderModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


def write_tiny_vae(out: Path, *, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), sample_size=32,
    )
    vae.save_pretrained(out)
    return Path(out)


def passthrough_vae(*, offset: float = 100.0, bias: float = 20.0):
    """An AutoencoderKL whose encoder and decoder are the identity on pixels (to about 1e-4), for
    end-to-end checks that must tell a sampled video from its training clip pixel by pixel.

    Latent channels 0-2 carry R, G, B unchanged (no downsampling; channel 3 is 0). The resnets
    and the mid block are made identities by zeroing their last convolution. The GroupNorm before
    each output convolution would normalise the pixels away, so every colour travels in a group
    of four channels (p, -p, offset, -offset): the group mean is exactly 0 and its deviation is
    offset/sqrt(2) up to a relative 5e-5 (pixels in [-1, 1]), so the norm scales p by a known
    constant; a shift of ``bias`` makes the SiLU after it linear, and the output convolution
    subtracts it again. The posterior's log-variance is -30 (std 3e-7).
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=3,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), block_out_channels=(12,),
        mid_block_add_attention=False, scaling_factor=1.0, sample_size=16,
    )
    with torch.no_grad():
        for param in vae.parameters():
            param.zero_()
        for coder in (vae.encoder, vae.decoder):
            _spread(coder.conv_in, offset)
            for norm in [m for m in coder.modules() if isinstance(m, torch.nn.GroupNorm)]:
                norm.weight.fill_(1.0)  # inside the (zeroed) residual branches: any value works
            coder.conv_norm_out.weight.zero_()
            for c in range(3):
                coder.conv_norm_out.weight[4 * c] = offset / 2**0.5
                coder.conv_norm_out.bias[4 * c] = bias
                coder.conv_out.weight[c, 4 * c, 1, 1] = 1.0
                coder.conv_out.bias[c] = -bias
        vae.encoder.conv_out.bias[4:] = -30.0  # log-variance of the posterior
        for conv in (vae.quant_conv, vae.post_quant_conv):
            conv.weight[:, :, 0, 0] = torch.eye(conv.weight.shape[0])
    return vae


def _spread(conv: torch.nn.Conv2d, offset: float) -> None:
    """conv_in: input channel c < 3 (a colour) -> channels 4c..4c+3 = (p, -p, offset, -offset)."""
    for c in range(3):
        conv.weight[4 * c, c, 1, 1] = 1.0
        conv.weight[4 * c + 1, c, 1, 1] = -1.0
        conv.bias[4 * c + 2] = offset
        conv.bias[4 * c + 3] = -offset


def write_passthrough_vae(out: Path) -> Path:
    passthrough_vae().save_pretrained(out)
    return Path(out)


def tiny_video_vae(kind: str = "wan"):
    """A video VAE of about 150k parameters that maps 1 + 4k frames of H x W to 1 + k latent frames of
    H/4 x W/4 with 4 channels. ``kind``: wan, hunyuan, ltx or cogvideox (the slowest on CPU)."""
    import diffusers

    if kind == "wan":  # per-channel latents_mean/std in the config, as Wan 2.1 has
        return diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                          temperal_downsample=[True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                          latents_std=[1.5, 0.5, 2.0, 1.0])
    if kind == "hunyuan":
        return diffusers.AutoencoderKLHunyuanVideo(
            latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 3, up_block_types=("HunyuanVideoUpBlock3D",) * 3,
            block_out_channels=(8, 8, 16), layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=4,
            temporal_compression_ratio=4, mid_block_add_attention=False)
    if kind == "ltx":  # latents_mean/std are buffers (saved with the weights), set below
        return diffusers.AutoencoderKLLTXVideo(
            latent_channels=4, block_out_channels=(8, 8, 16, 16), decoder_block_out_channels=(8, 8, 16, 16),
            layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5, spatio_temporal_scaling=(True, True, False, False),
            decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
            upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, patch_size=1, patch_size_t=1)
    if kind == "cogvideox":
        return diffusers.AutoencoderKLCogVideoX(
            down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
            block_out_channels=(8, 8, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4,
            sample_height=32, sample_width=32)
    raise ValueError(f"unknown tiny video VAE {kind!r}: wan, hunyuan, ltx or cogvideox")


def write_tiny_video_vae(out: Path, kind: str = "wan", *, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    vae = tiny_video_vae(kind)
    if kind == "ltx":
        vae.latents_mean.copy_(torch.tensor([0.2, 0.0, -0.1, 0.4]))
        vae.latents_std.copy_(torch.tensor([0.5, 2.0, 1.0, 1.5]))
    vae.save_pretrained(out)
    return Path(out)


def write_tiny_models(out: Path) -> tuple[Path, Path]:
    out = Path(out)
    return write_tiny_t5(out / "t5"), write_tiny_vae(out / "vae")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--video-vae", choices=["wan", "hunyuan", "ltx", "cogvideox"], default=None,
                        help="also write a tiny video VAE of this kind to OUT/video_vae")
    args = parser.parse_args()
    t5, vae = write_tiny_models(args.out)
    print(f"wrote {t5} and {vae}")
    if args.video_vae:
        print(f"wrote {write_tiny_video_vae(args.out / 'video_vae', args.video_vae)}")


if __name__ == "__main__":
    main()
