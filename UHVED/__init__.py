"""U-HVED (MICCAI 2019): hetero-modal variational encoder-decoder for joint modality completion and segmentation."""
