"""Multi-step jobs built from experiments and the libraries below them: SAE training (`sae_train`), latent
selection (`sae_latents`) and the whole "Do I know this entity?" pipeline (`sae_pipeline`). `plipy.api` is their
front door."""
