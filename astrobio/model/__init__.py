"""RebuiltLLMIntegration, its presets, cutting it into pipeline stages, and its fast paths (fused
Triton kernels, torch.compile of each block)."""

from astrobio.model.fast import compile_blocks, fuse_projections, use_kernels
from astrobio.model.presets import PRESETS, get_config
from astrobio.model.stages import PipelineStage, build_stage, even_split, split_model
from astrobio.model.transformer import ModelConfig, RebuiltLLMIntegration, build_model, init_parameters

__all__ = ["PRESETS", "ModelConfig", "PipelineStage", "RebuiltLLMIntegration", "build_model", "build_stage",
           "compile_blocks", "even_split", "fuse_projections", "get_config", "init_parameters", "split_model", "use_kernels"]
