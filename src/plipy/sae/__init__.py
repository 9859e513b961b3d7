"""Sparse autoencoders on the residual stream: the library the SAE experiments and workflows build on.

model     the SAE class (SAELens semantics), hook names, the steering layer
io        SAELens folders, Gemma Scope npz, SAELens releases
inputs    entity prompts, their entity token positions, latent files
steering  how a latent is added to the residual stream
measures  attention to the steered positions per layer and head, one forward at a time

The analysis itself is `plipy.experiments.sae_attention` (`plipy.sae_attention`); training, latent scores and the
whole pipeline are workflows (`plipy.workflows.sae_train`, `sae_latents`, `sae_pipeline`).
"""

from __future__ import annotations

from plipy.engine.arch import head_output_weights
from plipy.sae.io import load_sae, load_saelens_release, random_sae, save_npz, save_saelens
from plipy.sae.measures import MEASURES, Batch, forward_measures, key_index, layer_measures, make_batch
from plipy.sae.model import (
    ARCHITECTURES,
    SAE,
    check_model,
    hook_name_for_layer,
    parse_hook,
    resolve_layer,
    steer_layer,
)
from plipy.sae.steering import Steering, needs_residual, parse_coeff, steering_adds

__all__ = [
    "SAE",
    "ARCHITECTURES",
    "check_model",
    "hook_name_for_layer",
    "parse_hook",
    "resolve_layer",
    "steer_layer",
    "load_sae",
    "load_saelens_release",
    "random_sae",
    "save_npz",
    "save_saelens",
    "Steering",
    "needs_residual",
    "parse_coeff",
    "steering_adds",
    "MEASURES",
    "Batch",
    "forward_measures",
    "key_index",
    "layer_measures",
    "make_batch",
    "head_output_weights",
]
