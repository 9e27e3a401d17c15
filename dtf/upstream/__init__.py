"""Every private TensorFlow, Keras and keras-tuner name dtf uses, in one place."""
