"""Sparse autoencoders on the residual stream, and the "Do I know this entity?" SAE attention pipeline.

model    the SAE class (SAELens semantics) and hook names      io        SAELens folders, Gemma Scope npz
train    train an SAE offline (TopK, JumpReLU)                 latents   known/unknown latent scores
steering add a latent to the residual stream                   measures  attention measures per head
attention the steered-vs-original analysis                     pipeline  data → labels → SAE → analysis
inputs   entity prompts and their token positions
"""

from __future__ import annotations

from plipy.engine.arch import head_output_weights
from plipy.sae.attention import (
    AttentionConfig,
    Batch,
    difference,
    forward_measures,
    make_batch,
    parse_heads,
    pick_random_latents,
    resolve_layer,
    run_attention,
    significance,
    summarise,
)
from plipy.sae.io import load_sae, load_saelens_release, random_sae, save_npz, save_saelens
from plipy.sae.measures import MEASURES, key_index, layer_measures
from plipy.sae.model import ARCHITECTURES, SAE, check_model, hook_name_for_layer, parse_hook, steer_layer
from plipy.sae.steering import Steering, needs_residual, parse_coeff, steering_adds

__all__ = [
    "SAE",
    "ARCHITECTURES",
    "check_model",
    "hook_name_for_layer",
    "parse_hook",
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
    "key_index",
    "layer_measures",
    "head_output_weights",
    "AttentionConfig",
    "Batch",
    "difference",
    "forward_measures",
    "make_batch",
    "parse_heads",
    "pick_random_latents",
    "resolve_layer",
    "run_attention",
    "significance",
    "summarise",
]
