"""DMKD, Dual Masked Knowledge Distillation for object detection, in plain PyTorch (no Ray here)."""
from dmkd.distillers import DMKDLoss, MultiLevel, build_distiller
from dmkd.distillers.attention import attention_mask, channel_attention, spatial_attention

__all__ = ["DMKDLoss", "MultiLevel", "attention_mask", "build_distiller", "channel_attention", "spatial_attention"]
