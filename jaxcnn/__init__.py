"""jaxcnn: convolutional networks in JAX and Flax NNX, following the CNN chapters.

jaxcnn.ops         convolution and pooling as pure functions (jaxcnn.reference: their naive twins)
jaxcnn.models      the modern-CNN chapter's models and ResNet-50: create(name, ...), names()
jaxcnn.interop     PyTorch state dicts in and out (d2l's and torchvision's names)
jaxcnn.summary     the layer-by-layer table of a model, as the notes' layer_summary
jaxcnn.train       the train state and the jitted train/eval steps
jaxcnn.run         the whole run as a library: RunConfig, train_and_evaluate(config, workdir)
jaxcnn.checkpoint  checked Orbax checkpoints, and load_model(workdir) of a finished run
"""

from jaxcnn import layers, models, ops, reference
from jaxcnn.summary import summary

__version__ = "0.1.0"
__all__ = ["layers", "models", "ops", "reference", "summary"]
