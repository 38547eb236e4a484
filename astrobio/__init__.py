"""astrobio: full-parameter training of a 13B astrobiology language model on two 24 GB GPUs."""

__version__ = "0.1.0"
