"""megatron_var: VAR alignment (reward-weighted SFT) for Llama/Qwen on megatron-core."""
__version__ = "0.1.0"
