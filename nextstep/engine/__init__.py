"""From a caller's settings to pictures: settings and their defaults, sizes, families, prompts,
samplers, the token loop and previews.

Layer rule: imports ``models`` (and torch, transformers' tokenizers, PIL, numpy); nothing above it."""
