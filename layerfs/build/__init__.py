"""``layerfs build``: images from a Dockerfile, a layer per step, steps built before taken from a cache."""
