"""transformers' own delta-rule layers — Gated DeltaNet (Qwen3-Next, Qwen3.5, OLMo-hybrid and the
other hybrids built on it) and Kimi Delta Attention (Kimi Linear and its kin) — on linattn's
delta-rule operator, so that a pretrained hybrid model runs them with linattn's kernels: the fused
CPU kernel, the tensor-core kernels under the fused CUDA backend, torch.compile(fullgraph=True).

Those modeling modules call module-level kernel functions by name (`torch_chunk_gated_delta_rule`,
`torch_recurrent_gated_delta_rule`, `chunk_kimi_delta_attention`, `recurrent_kimi_delta_attention`:
flash-linear-attention's when it is installed and runs on the inputs' device, a pure-PyTorch loop
otherwise). use_fla_compat(model) points those names, in the modules that define the model's
classes, at linattn.fla_compat's functions of the same arguments; restore_fla_compat() puts the
originals back. The replacement is per modeling module, so it holds for every model of that type
in the process.
"""
import sys

from .. import fla_compat

__all__ = ["use_fla_compat", "restore_fla_compat"]


def _taking_model_arguments(function):
    """`function` (linattn.fla_compat's) called as transformers' modeling modules call their kernel
    functions: q, k, v, then keywords, among them the model's attention kwargs and `chunk_size`,
    which steer only fla's kernels."""
    def call(query, key, value, g, beta, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False,
             cu_seqlens=None, **_model_kwargs):
        return function(query, key, value, g, beta, initial_state=initial_state, output_final_state=output_final_state,
                        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, cu_seqlens=cu_seqlens)
    call.__name__ = f"linattn_{function.__name__}"
    return call


# The modeling modules' kernel names and what takes their place.
REPLACEMENTS = {
    "torch_chunk_gated_delta_rule": _taking_model_arguments(fla_compat.chunk_gated_delta_rule),
    "torch_recurrent_gated_delta_rule": _taking_model_arguments(fla_compat.fused_recurrent_gated_delta_rule),
    "chunk_kimi_delta_attention": _taking_model_arguments(fla_compat.chunk_kda),
    "recurrent_kimi_delta_attention": _taking_model_arguments(fla_compat.fused_recurrent_kda),
}
_originals = {}  # (module name, function name) -> the function replaced


def use_fla_compat(model) -> int:
    """Routes the delta-rule kernel functions of the modules that define `model`'s classes (its
    Gated DeltaNet / KDA layers) to linattn. Returns how many functions were replaced (0: the model
    has no such layer, or they were replaced already)."""
    replaced = 0
    for module_name in sorted({type(m).__module__ for m in model.modules()}):
        module = sys.modules.get(module_name)
        for name, replacement in REPLACEMENTS.items():
            current = getattr(module, name, None)
            if current is None or current is replacement:
                continue
            _originals[(module_name, name)] = current
            setattr(module, name, replacement)
            replaced += 1
    return replaced


def restore_fla_compat() -> int:
    """Puts back every function use_fla_compat replaced; returns how many."""
    for (module_name, name), original in _originals.items():
        setattr(sys.modules[module_name], name, original)
    restored = len(_originals)
    _originals.clear()
    return restored
