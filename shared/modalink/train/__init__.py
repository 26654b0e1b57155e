"""Training: cached encoder features, stage-1 alignment of projectors, the IMU encoder (IMU2CLIP-style)."""
