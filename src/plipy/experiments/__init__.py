"""Experiments: scan, knockout, steer, sae — each a function from (model, corpus, config) to a result dict."""
