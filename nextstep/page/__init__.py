"""The web page: every Gradio piece besides ``app.py`` (controls, runs, reuse, layout, the bounds a
public page keeps).

Layer rule: imports ``serving`` and everything below it; the only package that imports Gradio."""
