"""Training our own small NextStep on a procedural shapes world, and measuring it.

``python -m nextstep.train --out assets`` trains everything; ``python -m nextstep.train.evaluate``
scores a trained model with code (colour segmentation and simple geometry).
"""
