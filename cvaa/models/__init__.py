"""Generators (CVAA-GAN and baselines) and the conditional 3D PatchGAN discriminator."""
