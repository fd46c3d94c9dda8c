"""attend's fused attention as ``torch.library`` custom ops (compile- and export-safe)."""

from .attention import (EXPERIMENTAL, KERNELS, TRITON_IMPORT_ERROR, experimental_status, fused_attention, out_of_range,
                        supported_range)

__all__ = ["fused_attention", "KERNELS", "TRITON_IMPORT_ERROR", "EXPERIMENTAL", "experimental_status",
           "out_of_range", "supported_range"]
