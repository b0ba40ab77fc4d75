"""The bottom layer: helpers every other layer may use and that import nothing of megatron_var."""
