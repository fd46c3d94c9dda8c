"""attend's fused attention as ``torch.library`` custom ops (compile- and export-safe)."""

from .attention import fused_attention
from .registry import KERNELS, TRITON_IMPORT_ERROR, Kernel, launchers

__all__ = ["fused_attention", "Kernel", "KERNELS", "launchers", "TRITON_IMPORT_ERROR"]
