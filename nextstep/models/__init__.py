"""The networks: backbone, flow-matching head, VAE, their configs and weight quantization.

Layer rule: imports torch and transformers, nothing else of the package; knows nothing of files, Hubs,
memory plans or serving."""
