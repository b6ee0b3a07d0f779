"""Training: data, batching, losses, the reference, the loop, the recipes, torchrun."""
