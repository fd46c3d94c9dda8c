"""attend: PyTorch's attention system (``torch.nn.attention``) with its own Triton kernels.

See README.md for usage. Layers: ``kernels`` (Triton) -> ``ops`` (custom ops) ->
``backends`` (check + run) -> this module (dispatcher and public API).
"""

from ._dispatch import (
    Decision,
    can_use_cudnn_attention,
    can_use_efficient_attention,
    can_use_flash_attention,
    enabled_backends,
    explain,
    scaled_dot_product_attention,
)
from ._enums import SDPBackend
from ._params import SDPAParams
from ._registry import (
    activate_flash_attention_impl,
    current_flash_attention_impl,
    list_flash_attention_impls,
    register_flash_attention_impl,
    restore_flash_attention_impl,
)
from ._state import sdpa_kernel
from .backends import register_overrideable
from . import bias, distributed, flex_attention, varlen  # noqa: E402  (public submodules)

__version__ = "0.1.0"

# Note [unfused warnings]: set to True to warn, once per distinct set of reasons, whenever a
# call falls back to MATH, naming why each fused backend was rejected.
WARN_FOR_UNFUSED_KERNELS = False

__all__ = [
    "scaled_dot_product_attention", "SDPBackend", "sdpa_kernel", "enabled_backends",
    "WARN_FOR_UNFUSED_KERNELS", "SDPAParams", "can_use_flash_attention", "can_use_efficient_attention",
    "can_use_cudnn_attention", "explain", "Decision", "register_flash_attention_impl",
    "activate_flash_attention_impl", "list_flash_attention_impls", "current_flash_attention_impl",
    "restore_flash_attention_impl", "register_overrideable", "bias", "varlen", "flex_attention", "distributed",
]
