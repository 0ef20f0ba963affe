"""SFusion (MICCAI 2023): self-attention based N-to-one fusion for missing MRI modalities, in RobustSeg's framework."""
