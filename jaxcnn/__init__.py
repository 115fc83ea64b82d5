"""jaxcnn: convolutional networks in JAX and Flax NNX, following the CNN chapters."""

from jaxcnn import ops, reference

__version__ = "0.1.0"
__all__ = ["ops", "reference"]
