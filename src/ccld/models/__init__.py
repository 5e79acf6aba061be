"""The three frozen networks: the conditioned U-Net, CLOOB and the KL-f8 autoencoder."""
