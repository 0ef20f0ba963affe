"""ShaSpec (CVPR 2023): shared-specific feature modelling for multi-modal learning with missing modalities."""
