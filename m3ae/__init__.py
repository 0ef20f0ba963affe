"""M3AE: multimodal masked autoencoder pre-training, then segmentation fine-tuning."""
