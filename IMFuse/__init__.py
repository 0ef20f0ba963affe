"""IM-Fuse (MICCAI 2025): Mamba-based fusion for brain-tumour segmentation with missing MRI modalities."""
