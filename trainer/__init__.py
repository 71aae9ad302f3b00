"""Train one ResNet image classifier from a `TrainConfig`. Knows PyTorch; never imports optuna."""
