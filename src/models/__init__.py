"""Segmentation networks: V-Net with an optional CRF head."""
