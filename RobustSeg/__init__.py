"""RobustSeg / Robust-MSeg (MICCAI 2019): feature disentanglement and gated fusion for missing MRI modalities."""
