"""Model stages of the pipeline: train, evaluate, register."""
