"""Measuring a model on each language: the FFN inputs (HSA), layer similarity (Eq. 8-9),
language-specific neurons, where tokens are routed, and the profile's plots."""
