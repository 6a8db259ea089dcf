"""The frontend layer: from a user's ``tf.function``, callable or Keras model to a ``Program``.

``capture`` traces and converts; ``mark`` is the user's cut marker; ``custom_gradients``
keeps ``tf.custom_gradient`` ops differentiable once cut; ``keras_layers`` maps Keras layer
names to graph tensors. Reads only the IR layer.
"""

__all__: list[str] = []  # the modules are the API: import them by name
