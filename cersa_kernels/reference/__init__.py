"""Pure-PyTorch implementations: the CPU path, the fallback, and the oracle of every test."""
