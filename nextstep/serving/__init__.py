"""Serving the models to many callers: the ``Service``/``Ticket`` contract and its back ends (the
in-process scheduler, ZeroGPU, a Ray Serve application), and composing them.

Layer rule: imports ``models``, ``engine``, ``loading``, ``pipeline`` and ``pnginfo``; never Gradio."""
