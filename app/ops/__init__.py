"""Multi-scale deformable attention: the op, its kernels, its ONNX form, and model patching."""

from app.ops.msda import ms_deform_attn, ms_deform_attn_reference
from app.ops.patch import install_msda

__all__ = ["install_msda", "ms_deform_attn", "ms_deform_attn_reference"]
