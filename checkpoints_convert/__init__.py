"""The converters' documented commands (hf_to_megatron.py, megatron_to_hf.py); the code is megatron_var/convert/."""
