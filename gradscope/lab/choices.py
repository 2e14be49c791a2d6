"""Every choice the lab offers, as str Enums in one torch-free module, so the CLI types its
options with them without importing torch to print its help."""

from __future__ import annotations

from enum import StrEnum


class Variant(StrEnum):
    PLAIN = "plain"  # Linear -> activation, depth hidden layers
    RESIDUAL = "residual"  # x + fc2(act(fc1(x))), no normalization
    PRELN = "preln"  # x + fc2(act(fc1(LayerNorm(x)))), final LayerNorm
    POSTLN = "postln"  # LayerNorm(x + fc2(act(fc1(x))))
    RMSNORM = "rmsnorm"  # Pre-RMSNorm, final RMSNorm
    BATCHNORM = "batchnorm"  # Pre-BatchNorm residual, final BatchNorm


class Activation(StrEnum):
    RELU = "relu"
    TANH = "tanh"
    SIGMOID = "sigmoid"
    GELU = "gelu"


class Init(StrEnum):
    DEFAULT = "default"  # PyTorch's nn.Linear init, biases kept
    KAIMING = "kaiming"
    XAVIER = "xavier"
    ORTHOGONAL = "orthogonal"


class Classic(StrEnum):
    """The teaching text's classifiers."""

    DIGIT = "digit"  # 784-128-10 with ReLU
    DIGIT_DROPOUT = "digit-dropout"  # the same, dropout 0.2 after the hidden layer
    DEEP_DIGIT = "deep-digit"  # projection, two Pre-LN blocks with dropout 0.1, head


class OptimizerName(StrEnum):
    SGD = "sgd"  # with momentum
    ADAM = "adam"
    ADAMW = "adamw"


class Schedule(StrEnum):
    CONSTANT = "constant"
    COSINE = "cosine"


class DatasetName(StrEnum):
    MNIST = "mnist"
    FASHION_MNIST = "fashion-mnist"
    SYNTHETIC = "synthetic"
