"""RebuiltLLMIntegration, its presets, and cutting it into pipeline stages."""

from astrobio.model.presets import PRESETS, get_config
from astrobio.model.stages import PipelineStage, build_stage, even_split, split_model
from astrobio.model.transformer import ModelConfig, RebuiltLLMIntegration, build_model, init_parameters

__all__ = ["PRESETS", "ModelConfig", "PipelineStage", "RebuiltLLMIntegration", "build_model", "build_stage",
           "even_split", "get_config", "init_parameters", "split_model"]
