"""MultiMNIST: classify the left and the right digit of two overlaid MNIST digits (LeNet)."""
