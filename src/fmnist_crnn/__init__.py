"""CRNN on Fashion-MNIST: the library behind the DVC stages."""
