"""attend's fused attention as ``torch.library`` custom ops (compile- and export-safe)."""

from .attention import fused_attention
from .registry import EXPERIMENTAL, KERNELS, TRITON_IMPORT_ERROR, Kernel, experimental_status, launchers

__all__ = ["fused_attention", "Kernel", "KERNELS", "launchers", "TRITON_IMPORT_ERROR", "EXPERIMENTAL",
           "experimental_status"]
