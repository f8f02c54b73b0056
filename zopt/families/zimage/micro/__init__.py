"""A micro Z-Image trained on procedural shapes: dataset, adherence detector, training, shipped weights."""
