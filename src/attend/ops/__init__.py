"""attend's fused attention as ``torch.library`` custom ops (compile- and export-safe)."""

from .attention import KERNELS, TRITON_IMPORT_ERROR, fused_attention

__all__ = ["fused_attention", "KERNELS", "TRITON_IMPORT_ERROR"]
