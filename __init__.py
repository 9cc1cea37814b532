"""mlakit: turn Hugging Face GQA/MHA checkpoints into DeepSeek-V3 Multi-head Latent Attention checkpoints."""

__version__ = "0.1.0"
