"""Missing-as-Masking (MaM, "M³FeCon"): modality-specific nnU-Net encoders with learned bottleneck tokens and a
transformer that reconstructs missing modalities' features, trained with nnU-Net v2 (the pinned PyPI package)."""
