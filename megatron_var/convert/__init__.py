"""HF <-> megatron-core checkpoint conversion for Llama 2/3.x and Qwen2/2.5 (see hf_to_megatron.py,
megatron_to_hf.py). Shared logic in core.py; one mapping table per family."""

from megatron_var.convert.core import FamilyMap


def family_map(family: str) -> FamilyMap:
    """The mapping table of a ModelArch family; ValueError for an unknown one."""
    from megatron_var.convert import llama, qwen2

    tables = {"llama": llama.MAPPING, "qwen2": qwen2.MAPPING}
    if family not in tables:
        raise ValueError(f"no conversion table for model family {family!r}; supported: {sorted(tables)}")
    return tables[family]
