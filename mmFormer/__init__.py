"""mmFormer (MICCAI 2022): multimodal transformer for brain-tumour segmentation with missing modalities."""
