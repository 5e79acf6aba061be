"""Files in and out: the one reader of untrusted checkpoints, the converted-weights cache, the hub,
images and PNGs, atomic writes."""
