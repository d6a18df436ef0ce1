"""Disk and Hub to modules: checkpoint files, Hub ids, memory plans, devices and the runtime options.

Layer rule: imports ``models`` and ``engine`` (and huggingface_hub, safetensors); nothing above it."""
